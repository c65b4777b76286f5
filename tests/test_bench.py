"""bench/run_all.py: runs the chosen benchmarks in subprocesses and writes one report, failures included."""

import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def test_run_all_writes_the_report_and_flags_failures(tmp_path):
    import run_all

    out = tmp_path / "RESULTS.md"
    assert run_all.main(["--only", "params", "--out", str(out)]) == 0
    text = out.read_text()
    assert "python bench/param_count.py" in text and "logical CPUs" in text
    assert "MDLM 12/0/0" in text and "169,627,218" in text  # the measured count, not a placeholder

    broken = [("params", "A benchmark that crashes", ["-c", "import sys; sys.exit('boom')"])]
    with mock.patch.object(run_all, "benches", return_value=broken):
        assert run_all.main(["--out", str(out)]) == 1
    assert "FAILED (exit 1)" in out.read_text() and "boom" in out.read_text()


def _point(model, reuse, budget, nll, schedule="decreasing", evaluator="char-lm", **kw):
    import math

    from fpmgm_hf.evaluation.sweep_report import SweepPoint

    gen = math.exp(sum(nll) / len(nll))
    return SweepPoint(model, reuse, schedule, budget, budget // 4, gen, gen, 3.0, float(budget), 1.0, "",
                      {"per_sample_nll": nll}, evaluator=evaluator, ci95=[gen * 0.9, gen * 1.1], n_samples=len(nll),
                      **kw)


def test_claim_verdicts_follow_the_intervals():
    import math

    import torch
    from repro_claims import ratio_ci, verdict, verdict_at_least

    assert verdict([(0.8, 0.7, 0.9), (0.5, 0.4, 0.6)]) == "holds"
    assert verdict([(0.8, 0.7, 0.9), (1.2, 1.1, 1.3)]) == "fails"
    assert verdict([(0.9, 0.8, 1.1)]) == "inconclusive" and verdict([]) == "not measured"
    below, above, tie = (0.5, 0.4, 0.6), (1.5, 1.4, 1.6), (1.0, 0.9, 1.1)
    assert verdict_at_least([below, below, above], 2) == "holds"
    assert verdict_at_least([below, tie, tie], 2) == "inconclusive"
    assert verdict_at_least([below, above, above], 2) == "fails" and verdict_at_least([below], 2) == "fails"
    g = torch.Generator().manual_seed(0)
    a = (1.0 + 0.1 * torch.randn(200, generator=g)).tolist()
    b = (1.5 + 0.1 * torch.randn(200, generator=g)).tolist()
    ratio, lo, hi = ratio_ci(_point("a", "none", 96, a), _point("b", "none", 96, b))
    assert lo < ratio < hi and abs(ratio - math.exp(sum(a) / len(a) - sum(b) / len(b))) < 1e-9
    assert hi < 0.7  # 200 samples separate a 40% gap


def test_reproduction_report_fills_the_claims_table_and_the_schema(tmp_path, monkeypatch):
    import json
    from argparse import Namespace
    from dataclasses import asdict

    import repro_claims

    out, docs = tmp_path / "repro", tmp_path / "docs"
    good, bad = [0.5] * 64, [1.5] * 64
    points = [_point("MDLM", "none", b, bad) for b in (24, 96)]
    points += [_point("FP-MDLM + L_CONS", r, b, good if r == "3sr" else bad) for r in ("none", "full", "3sr")
               for b in (24, 96)]
    points += [_point("MDLM", "none", 24, bad, evaluator="general")]
    points += [_point("FP-MDLM", "none", b, bad) for b in (24, 96)]
    points += [_point("shallow twin", "none", b, bad) for b in (24, 96)]
    (out / "sweep" / "x" / "samples").mkdir(parents=True)
    for p in points:
        p.samples_file = f"samples/{p.model}_{p.reuse}_{p.budget}_{p.evaluator}.jsonl"
        (out / "sweep" / "x" / p.samples_file).write_text(json.dumps({"text": p.model}) + "\n")
    payload = {"eval_lm": {}, "points": [asdict(p) for p in points]}
    (out / "sweep" / "x" / "results.json").write_text(json.dumps(payload))
    cfg = dict(num_pre_layers=1, num_fp_layers=1, num_post_layers=1, hidden_size=8, vocab_size=10,
               fp_train_nograd_iters=[0, 4], fp_train_grad_iters=[3, 6], fp_max_iter=8)
    twin_rows = [2.2 + 0.01 * (i % 7) for i in range(100)]
    (out / "nelbo.json").write_text(json.dumps({
        "MDLM": {"val_nelbo": 2.0, "params": 100},
        "shallow twin": {"val_nelbo": 2.2, "params": 38, "rows": twin_rows,
                         "config": dict(cfg, num_pre_layers=3, num_fp_layers=0, num_post_layers=0)},
        "FP-MDLM": {"val_nelbo": 2.05, "params": 40, "rows": [r - 0.1 for r in twin_rows], "config": cfg,
                    "nelbo_by_iters": {str(n): 2.05 for n in (1, 2, 4, 8, 16, 32)}}}))
    (out / "stages.jsonl").write_text(json.dumps({"stage": "mdlm", "cmd": ["python", "x"], "seconds": 12}) + "\n")
    (out / "contract").mkdir()
    profile = {r: {"residual": {"8": 1e-3, "32": g, "64": g}, "growth_per_iter": 1.0} for r, g in
               (("0.15", 4e-8), ("0.5", 2e-7), ("0.9", 1e-8))}
    (out / "contract" / "FP_MDLM.json").write_text(json.dumps(
        {"profile": profile, "generation": {"full": {"finite": True}, "3sr": {"finite": False}},
         "failures": ["generate(reuse='3sr'): boom"]}))
    docs.mkdir()
    (docs / "findings.md").write_text("## Findings\n\nhand-written\n")
    monkeypatch.setattr(repro_claims, "corpus_entropies",
                        lambda *a: {"unigram_entropy": 3.3, "bigram_entropy": 2.5, "train_tokens_per_epoch": 1})
    args = Namespace(batch=32, seq_len=128, steps=10, cons_steps=2, conv_steps=3)
    repro_claims.write_report(out, docs, args)
    results = json.loads((docs / "results.json").read_text())
    assert set(results) == {"tokenizer", "unigram_entropy", "bigram_entropy", "models", "sweep", "claims"}
    mdlm = results["models"]["MDLM"]
    assert {k: mdlm[k] for k in ("val_nelbo", "params", "baseline", "train_tokens")} == {
        "val_nelbo": 2.0, "params": 100, "baseline": True, "train_tokens": 40960}
    twin, fp = results["models"]["shallow twin"], results["models"]["FP-MDLM"]
    assert twin["shallow_twin"] is True and twin["baseline"] is True and "shallow_twin" not in fp
    assert set(fp["nelbo_by_iters"]) == {"1", "2", "4", "8", "16", "32"} and "nelbo_by_iters" not in twin
    # S-JFB's 2 no-grad + 4.5 graph iterations make an FP step dearer than its 3-block twin's
    assert fp["train_flops"] > twin["train_flops"] > 0
    assert {c["verdict"] for c in results["claims"]} <= {"holds", "fails", "inconclusive", "not measured"}
    for row in results["sweep"]:  # every final point's samples, gzipped, re-scorable
        import gzip

        path = docs / row["samples"]
        assert json.loads(gzip.decompress(path.read_bytes()).decode().splitlines()[0])["text"] == row["model"]
    assert {p["evaluator"] for p in results["sweep"]} == {"char-lm", "general"}
    text = (docs / "README.md").read_text()
    claims = {c["claim"]: c["verdict"] for c in json.loads((out / "claims.json").read_text())}
    assert claims["CoFRe better than MDLM at every budget (gen-PPL ratio CoFRe / MDLM)"] == "holds"
    assert claims["3SR better than no reuse at ≥ 2 budgets (CoFRe 3SR / CoFRe none)"] == "holds"
    assert claims["CoFRe better than FP-MDLM at ≥ 3 budgets (gen-PPL ratio CoFRe 3SR / FP-MDLM none)"] == (
        "fails")  # two budgets can never make three
    assert claims["FP-MDLM beats its shallow twin in held-out NELBO (FP-MDLM − twin, nats/char, paired)"] == "holds"
    assert claims["FP-MDLM's likelihood close to MDLM's (held-out NELBO, relative)"] == "holds"  # +2.5%
    assert "| fewer parameters (FP-MDLM / MDLM) | 0.612 (−38.8%) | 0.400 (40 / 100) | **holds** |" in text
    assert "| FP-MDLM | 2e-07 | ×1.0000 | ok / non-finite | fails: generate(reuse='3sr'): boom |" in text
    assert text.rstrip().endswith("hand-written") and "| mdlm |  | 12 | `python x` |" in text


def test_reproduction_waits_for_the_evaluator_to_finish_not_for_its_first_export(tmp_path):
    import json

    import reproduce_text

    args = reproduce_text.parse_args(["--lm-steps", "40"])
    assert not reproduce_text.lm_done(args, tmp_path)
    (tmp_path / "char-lm" / "final").mkdir(parents=True)  # written at the first validation, mid-training
    log = tmp_path / "char-lm" / "log.jsonl"
    log.write_text(json.dumps({"step": 20, "val_loss": 2.0}) + "\n")
    assert not reproduce_text.lm_done(args, tmp_path)
    with open(log, "a") as f:
        f.write(json.dumps({"step": 40, "val_loss": 1.9}) + "\n")
    assert reproduce_text.lm_done(args, tmp_path)


def test_run_all_subset_keeps_the_sections_it_did_not_rerun(tmp_path):
    import run_all

    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\nold header\n\n## Parameter counts (MDLM-small sizes)\n\nstale\n\n"
                   "## Training cost, GPT-2 vocabulary (50,258)\n\nkept 0.990\n")
    assert run_all.main(["--only", "params", "--out", str(out)]) == 0
    text = out.read_text()
    assert "stale" not in text and "169,627,218" in text and "kept 0.990" in text and "old header" not in text
    assert text.index("## Parameter counts") < text.index("## Training cost")  # order kept


def test_depth_ablation_harness_toy_run(tmp_path):
    import fp_depth

    argv = ["--steps", "3", "--hidden", "32", "--heads", "4", "--seq-len", "16", "--batch", "4",
            "--variants", "twin", "no-penalty", "--gen-steps", "4", "--out", str(tmp_path / "o"),
            "--docs", str(tmp_path / "d")]
    results = fp_depth.main(argv)
    assert [r["variant"] for r in results] == ["twin", "no-penalty"]
    fp = results[1]
    assert set(fp["depth"]["nelbo_by_iters"]) == {"1", "2", "4", "8", "16", "32"} and "contract" in fp
    assert list(fp["shares"]) == ["pre0", "fp0", "post0"] and fp["fields"]["fp_residual_reg"] == 0.0
    readme = (tmp_path / "d" / "README.md").read_text()
    assert "shallow twin" in readme and "constrained, no penalty" in readme
    again = fp_depth.main(argv)  # resumes: finished variants are read back
    assert [r["depth"] for r in again] == [r["depth"] for r in results]
