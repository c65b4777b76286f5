"""The budget sweep CLI end to end on tiny models with a tiny local evaluation LM."""

import json
import math

import torch
from conftest import MASK, VOCAB, tiny_config, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from fpmgm_hf.evaluation import main, step_grid


def tiny_tokenizer():
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[MASK]": MASK}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", eos_token="w0", pad_token="w0")


def tiny_lm(path):
    """A one-layer GPT-2 over the tiny vocabulary, saved with its tokenizer: a local evaluation LM."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_step_grid():
    assert step_grid(tiny_model().config, 96) == [9, 16, 24, 32]  # 96 // (2 + n) for n = 8, 4, 2, 1
    assert step_grid(tiny_model(num_pre_layers=12, num_fp_layers=0, num_post_layers=0).config, 96) == [8]


def test_sweep_writes_tables_plots_samples_and_resumes(tmp_path):
    tok = tiny_tokenizer()
    for name, kw in (("fp", {}), ("mdlm", dict(num_pre_layers=3, num_fp_layers=0, num_post_layers=0))):
        model = tiny_model(**kw)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    tiny_lm(tmp_path / "lm")
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "--model",
        str(tmp_path / "fp"),
        str(tmp_path / "mdlm"),
        "--names",
        "fp",
        "mdlm",
        "--budgets",
        "12",
        "24",
        "--reuse",
        "none",
        "3sr",
        "--num-samples",
        "3",
        "--seq-len",
        "8",
        "--batch-size",
        "2",
        "--eval-lm",
        str(tmp_path / "lm"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    best = {(p["model"], p["reuse"], p["budget"]) for p in results["best"]}
    assert best == {
        ("fp", "none", 12),
        ("fp", "none", 24),
        ("fp", "3sr", 12),
        ("fp", "3sr", 24),
        ("mdlm", "none", 12),
        ("mdlm", "none", 24),
    }
    for p in results["points"]:
        assert p["block_passes"] <= p["budget"] and p["gen_ppl"] > 0 and p["entropy"] >= 0
        assert len((out / p["samples_file"]).read_text().splitlines()) == 3
    assert results["eval_lm"][str(tmp_path / "lm")]["comparable_to_published"] is False
    assert "| fp | 3sr | decreasing |" in (out / "results.md").read_text()
    assert all(p["ci95"][0] <= p["gen_ppl"] <= p["ci95"][1] for p in results["points"])
    assert (out / "quality_vs_budget.png").stat().st_size > 1000
    # A re-run finds every point in points.jsonl and generates nothing new.
    n_lines = len((out / "points.jsonl").read_text().splitlines())
    assert main(argv) == 0
    assert len((out / "points.jsonl").read_text().splitlines()) == n_lines


def test_sweep_records_diverging_points_and_keeps_going(tmp_path):
    from fpmgm_hf import FPMGMForMaskedGeneration

    tok = tiny_tokenizer()
    # identity concat injection: f(z) = 1e6 z; full reuse carries z (safety net off, as in older checkpoints)
    model = FPMGMForMaskedGeneration(tiny_config(injection="concat_mlp", fp_divergence_patience=None))
    with torch.no_grad():
        model.model.injection.fc2.weight.mul_(1e6)
    model.save_pretrained(tmp_path / "bad")
    tok.save_pretrained(tmp_path / "bad")
    tiny_lm(tmp_path / "lm")
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(tmp_path / "bad"), "--names", "bad", "--budgets", "6", "48", "--reuse", "full",
            "--num-samples", "2", "--seq-len", "8", "--batch-size", "2", "--eval-lm", str(tmp_path / "lm"),
            "--out", str(out)]
    assert main(argv) == 0
    best = {p["budget"]: p for p in json.loads((out / "results.json").read_text())["best"]}
    assert best[6]["gen_ppl"] > 0  # 6 = 2 steps x (2 blocks + 1 iteration): still finite
    assert math.isnan(best[48]["gen_ppl"]) and "non-finite" in best[48]["extra"]["diverged"]
    assert "diverged [T=" in (out / "results.md").read_text()
    assert main(argv) == 0  # NaN points resume from points.jsonl like any other


def test_sweep_pilots_choose_the_step_count_and_every_evaluator_scores_the_winner(tmp_path):
    tok = tiny_tokenizer()
    tiny_model().save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    tiny_lm(tmp_path / "lm")
    tiny_lm(tmp_path / "lm2")
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(tmp_path / "fp"), "--names", "fp", "--budgets", "24", "--reuse", "3sr",
            "--fp-tol", "none", "0.01", "--num-samples", "4", "--pilot-samples", "2", "--seq-len", "8",
            "--batch-size", "2", "--eval-lm", str(tmp_path / "lm"), str(tmp_path / "lm2"),
            "--eval-lm-names", "a", "b", "--out", str(out)]
    assert main(argv) == 0
    points = json.loads((out / "results.json").read_text())["points"]
    pilots = [p for p in points if p["status"] == "pilot"]
    finals = [p for p in points if p["status"] == "ok"]
    assert {p["num_steps"] for p in pilots} == set(step_grid(tiny_model().config, 24)) and pilots[0]["n_samples"] == 2
    assert {p["evaluator"] for p in pilots} == {"a"}
    for tol in (None, 0.01):
        winner = min((p for p in pilots if p["fp_tol"] == tol), key=lambda p: p["gen_ppl"])
        chosen = [p for p in finals if p["fp_tol"] == tol]
        assert {p["evaluator"] for p in chosen} == {"a", "b"} and all(p["n_samples"] == 4 for p in chosen)
        assert {p["num_steps"] for p in chosen} == {winner["num_steps"]}
    assert all(p["block_passes"] <= p["budget"] for p in finals)
    md = (out / "results.md").read_text()
    assert "decreasing, tol 0.01" in md and md.count("Evaluator `") == 2
