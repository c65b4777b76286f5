"""The report of bench/reproduce_text.py: held-out NELBO, `results.json` in the published schema, and the claims
table, each paper claim decided from bootstrap intervals over samples.

A comparison of two sweep points uses the per-sample NLLs stored with them: the ratio of generative
perplexities is exp(mean NLL_a - mean NLL_b), and its 95% interval comes from resampling each point's samples
(the two sample sets are independent). "a beats b" holds when the whole interval lies below 1.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from reproduce_text import SCHED, last_step, slug

from fpmgm_hf.evaluation.sweep_report import SweepPoint, best_per_budget, markdown_table, plot

PRIMARY = "char-lm"  # the in-domain evaluator decides; the general LM is reported beside it


# --------------------------------------------------------------------------------------------- NELBO


@torch.no_grad()
def heldout_nelbo(model_dir: Path, tokenizer_dir: Path, args, draws: int = 2) -> dict:
    """NELBO (nats per character) of a model on every held-out block, the same masks for every model; fixed-point
    models at 1..32 iterations too. `rows` keeps the per-block values behind `val_nelbo` (paired comparisons)."""
    from fpmgm_hf import FPMGMForMaskedGeneration
    from fpmgm_hf.data import load_texts, load_training_tokenizer, pack_blocks, split_blocks
    from fpmgm_hf.evaluation.depth import ITERS, nelbo_rows

    tok = load_training_tokenizer(str(tokenizer_dir))
    _, val = split_blocks(pack_blocks(load_texts("shakespeare"), tok, args.seq_len), 0.05)
    model = FPMGMForMaskedGeneration.from_pretrained(model_dir).eval()
    default = model.config.fp_max_iter
    iters = sorted(set(ITERS) | {default}) if model.config.num_fp_layers else [default]
    rows = {n: nelbo_rows(model, val, n, batch_size=64, draws=draws, seed=1000) for n in iters}
    out = {"val_nelbo": float(rows[default].mean()), "params": sum(p.numel() for p in model.parameters()),
           "val_blocks": int(val.shape[0]), "rows": [round(float(v), 6) for v in rows[default]],
           "config": {k: getattr(model.config, k) for k in FLOP_FIELDS}}
    if model.config.num_fp_layers:
        out["nelbo_by_iters"] = {str(n): float(r.mean()) for n, r in rows.items() if n in ITERS}
    return out


FLOP_FIELDS = ("num_pre_layers", "num_fp_layers", "num_post_layers", "hidden_size", "vocab_size",
               "fp_train_nograd_iters", "fp_train_grad_iters", "fp_max_iter", "fp_residual_reg",
               "fp_residual_reg_iters", "fp_residual_reg_prob")


def paired_diff_ci(a: list, b: list, resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a - b) over paired per-block NELBOs and its 95% bootstrap interval (blocks resampled together)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(0, d.numel(), (resamples, d.numel()), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(d.mean()), lo, hi


def train_flops_per_token(config: dict, seq_len: int, consistency: bool = False) -> float:
    """Training FLOPs per token of one optimizer step, counted by block passes: a block pass costs
    2 * P_block + 4 * L * D forward (matmuls and attention), backward twice that. S-JFB runs E[n] no-grad and E[m]
    graph iterations; the consistency stage adds a no-grad teacher pass at `fp_max_iter` iterations. The head
    (2 * D * V forward) is counted; embeddings, norms and adaLN are not."""
    D, V = config["hidden_size"], config["vocab_size"]
    block = 2 * (12 * D * D + 9 * D) + 4 * seq_len * D  # qkv 3D^2 + out D^2 + MLP 8D^2 (+ biases)
    head = 2 * D * V
    explicit = config["num_pre_layers"] + config["num_post_layers"]
    nograd = graph = 0.0
    if config["num_fp_layers"]:
        nograd = sum(config["fp_train_nograd_iters"]) / 2 * config["num_fp_layers"]
        graph = sum(config["fp_train_grad_iters"]) / 2 * config["num_fp_layers"]
    flops = 3 * (explicit + graph) * block + nograd * block + 3 * head
    if config["num_fp_layers"] and config.get("fp_residual_reg", 0) > 0 and config.get("fp_residual_reg_iters", 0):
        # the deep residual penalty: k no-grad iterations and one graph iteration, on a fraction of the steps
        deep = config["fp_residual_reg_iters"] + 3
        flops += config.get("fp_residual_reg_prob", 1.0) * deep * config["num_fp_layers"] * block
    if consistency:
        flops += (explicit + config["fp_max_iter"] * config["num_fp_layers"]) * block + head
    return flops


def corpus_entropies(tokenizer_dir: Path, seq_len: int) -> dict:
    """Unigram and bigram conditional entropies (nats per token) of the training blocks."""
    from fpmgm_hf.data import load_texts, load_training_tokenizer, pack_blocks, split_blocks

    tok = load_training_tokenizer(str(tokenizer_dir))
    train, _ = split_blocks(pack_blocks(load_texts("shakespeare"), tok, seq_len), 0.05)
    x, V = train.flatten(), len(tok)
    p = torch.bincount(x, minlength=V).double() / x.numel()
    unigram = float(-(p[p > 0] * p[p > 0].log()).sum())
    joint = torch.bincount(x[:-1] * V + x[1:], minlength=V * V).double().view(V, V)
    joint /= joint.sum()
    cond = joint / joint.sum(1, keepdim=True).clamp_min(1e-300)
    m = joint > 0
    return {"unigram_entropy": unigram, "bigram_entropy": float(-(joint[m] * cond[m].log()).sum()),
            "train_tokens_per_epoch": int(x.numel())}


# --------------------------------------------------------------------------------------------- compare


def ratio_ci(a: SweepPoint, b: SweepPoint, resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """gen_ppl(a) / gen_ppl(b) and its 95% bootstrap interval."""
    na = torch.tensor(a.extra["per_sample_nll"], dtype=torch.float64)
    nb = torch.tensor(b.extra["per_sample_nll"], dtype=torch.float64)
    na, nb = na[~torch.isnan(na)], nb[~torch.isnan(nb)]
    g = torch.Generator().manual_seed(seed)
    ma = na[torch.randint(0, na.numel(), (resamples, na.numel()), generator=g)].mean(1)
    mb = nb[torch.randint(0, nb.numel(), (resamples, nb.numel()), generator=g)].mean(1)
    lo, hi = torch.quantile((ma - mb).exp(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(float(na.mean() - nb.mean())), lo, hi


def verdict(intervals: list[tuple[float, float, float]], want_below: bool = True) -> str:
    """'holds' when every interval is on the claimed side of 1, 'fails' when any is on the other side,
    otherwise 'inconclusive'."""
    if not intervals:
        return "not measured"
    good = [(hi < 1) if want_below else (lo > 1) for _, lo, hi in intervals]
    bad = [(lo > 1) if want_below else (hi < 1) for _, lo, hi in intervals]
    return "holds" if all(good) else ("fails" if any(bad) else "inconclusive")


def verdict_at_least(intervals: list[tuple[float, float, float]], k: int) -> str:
    """'holds' when at least `k` intervals lie wholly below 1, 'fails' when that can no longer be (too many
    intervals wholly above 1 or too few budgets), otherwise 'inconclusive'."""
    if not intervals:
        return "not measured"
    below = sum(hi < 1 for _, _, hi in intervals)
    above = sum(lo > 1 for _, lo, _ in intervals)
    if below >= k:
        return "holds"
    return "fails" if len(intervals) - above < k else "inconclusive"


def _fmt(r) -> str:
    return f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


class Sweep:
    """The best points per (row, budget) under one evaluator, looked up by model / reuse / schedule."""

    def __init__(self, points: list[SweepPoint], evaluator: str = PRIMARY):
        self.rows = [p for p in best_per_budget(points) if p.evaluator == evaluator and p.status == "ok"]
        self.budgets = sorted({p.budget for p in self.rows})

    def get(self, model, reuse="none", schedule="decreasing", budget=None, tol=None):
        for p in self.rows:
            if (p.model, p.reuse, p.budget, p.fp_tol) == (model, reuse, budget, tol) and (
                    p.fp_schedule == schedule or model in BASELINES):
                return p
        return None

    def compare(self, a: tuple, b: tuple, budgets=None) -> list:
        """[(budget, ratio a/b with interval)] where both rows have a point."""
        out = []
        for budget in budgets or self.budgets:
            pa, pb = self.get(*a, budget=budget), self.get(*b, budget=budget)
            if pa is not None and pb is not None:
                out.append((budget, ratio_ci(pa, pb)))
        return out


COFRE = ("FP-MDLM + L_CONS", "3sr", "decreasing")
FP = ("FP-MDLM", "none", "decreasing")
TWIN = ("shallow twin", "none")
BASELINES = ("MDLM", "shallow twin")


def claims(sweep: Sweep, nelbo: dict, times: dict, logs: dict) -> list[dict]:
    """Every claim of the paper we can test, with our figure, its interval and a verdict."""
    rows = []

    def add(claim, paper, cmp, want_below=True, note=""):
        figure = "; ".join(f"B{b}: {_fmt(r)}" for b, r in cmp)
        rows.append({"claim": claim, "paper": paper, "ours": figure or "n/a", "note": note,
                     "verdict": verdict([r for _, r in cmp], want_below)})

    def add_k(claim, paper, cmp, k, note=""):
        below = sum(r[2] < 1 for _, r in cmp)
        figure = "; ".join(f"B{b}: {_fmt(r)}" for b, r in cmp)
        rows.append({"claim": claim, "paper": paper, "ours": f"{figure} (below 1 at {below} of {len(cmp)})"
                     if cmp else "n/a", "note": note, "verdict": verdict_at_least([r for _, r in cmp], k)})

    mdlm = ("MDLM", "none")
    add("CoFRe better than MDLM at every budget (gen-PPL ratio CoFRe / MDLM)", "−74% to −88%",
        sweep.compare(COFRE, mdlm))
    rows.append(_twin_nelbo_claim(nelbo))
    add_k("FP-MDLM beats its shallow twin at ≥ 3 budgets (gen-PPL ratio FP-MDLM / twin, no reuse)",
          "no twin in the paper", sweep.compare(FP, TWIN), 3)
    add_k("CoFRe better than FP-MDLM at ≥ 3 budgets (gen-PPL ratio CoFRe 3SR / FP-MDLM none)",
          "0.21–0.26 (Table 24)", sweep.compare(COFRE, FP), 3, note="target: ≤ 0.7; " + entropy_note(sweep, COFRE, FP))
    add_k("L_CONS alone helps (CoFRe none / FP-MDLM none)", "part of the 0.21–0.26",
          sweep.compare(COFRE[:1] + ("none", "decreasing"), FP), 3,
          note=entropy_note(sweep, COFRE[:1] + ("none", "decreasing"), FP))
    add_k("3SR alone helps (FP-MDLM 3SR / FP-MDLM none)", "Fig. 5: 3SR below none on FP-MDLM",
          sweep.compare(FP[:1] + ("3sr", "decreasing"), FP), 2)
    fp_vs = sweep.compare(FP, mdlm)
    low, high = fp_vs[:1], fp_vs[-1:]
    rows.append({"claim": "FP-MDLM alone better than MDLM only at the lowest budgets (ratio FP-MDLM / MDLM)",
                 "paper": "better at ≤ 192, worse at ≥ 384",
                 "ours": "; ".join(f"B{b}: {_fmt(r)}" for b, r in fp_vs) or "n/a",
                 "verdict": _only_lowest(low, high), "note": ""})
    add_k("3SR better than no reuse at ≥ 2 budgets (CoFRe 3SR / CoFRe none)", "−2% to −11% (B96–B384)",
          sweep.compare(COFRE, COFRE[:1] + ("none", "decreasing")), 2)
    add("3SR better than full reuse (CoFRe 3SR / CoFRe full)", "better at 3 of 4 budgets",
        sweep.compare(COFRE, COFRE[:1] + ("full", "decreasing")))
    # 1-2 iterations per step round both schedules to the same plan: they are compared at 4
    add("the decreasing schedule beats the fixed one (CoFRe 3SR at 4 iterations per step, decreasing / fixed)",
        "best in 8 of 12 settings", sweep.compare((SCHED, "3sr", "decreasing"), (SCHED, "3sr", "fixed")))
    conv = ("converted", "3sr")
    add("conversion beats training from scratch at equal fine-tuning steps (converted 3SR / scratch 3SR)",
        "Table 8: init better at every budget", sweep.compare(conv, ("FP-MDLM, scratch (conversion steps)", "3sr")))
    add_k("the converted model beats its teacher at B24 and B48 (converted 3SR / MDLM)",
          "§3.4: better at low budgets", sweep.compare(conv, mdlm, budgets=[24, 48]), 2)
    add_k("the converted model against FP-MDLM trained from scratch for the teacher's steps (converted / FP-MDLM, "
          "both 3SR)", "Table 8: converted better at every budget",
          sweep.compare(conv, FP[:1] + ("3sr", "decreasing")), len(sweep.budgets))
    rows.append(_conversion_nelbo_claim(nelbo))
    rows.append(_collapse_claim(sweep, logs))
    rows.append(_match_claim(sweep))
    rows += _ratio_claims(nelbo, times)
    return rows


ENTROPY_FLAG = 0.05  # nats: a sample-entropy drop this large can buy a lower gen-PPL by itself


def entropy_note(sweep: Sweep, a: tuple, b: tuple) -> str:
    """The unigram-entropy difference a − b per budget, flagged where a's samples are markedly less diverse (a
    gen-PPL gain bought with entropy)."""
    deltas = [(bud, pa.entropy - pb.entropy) for bud in sweep.budgets
              if (pa := sweep.get(*a, budget=bud)) is not None and (pb := sweep.get(*b, budget=bud)) is not None]
    if not deltas:
        return "entropy: n/a"
    text = "entropy difference: " + ", ".join(f"B{bud} {d:+.3f}" for bud, d in deltas)
    flagged = [f"B{bud}" for bud, d in deltas if d < -ENTROPY_FLAG]
    return text + (f" (gain partly bought with entropy at {', '.join(flagged)})" if flagged else "")


def _twin_nelbo_claim(nelbo: dict) -> dict:
    """FP-MDLM against its shallow twin in held-out NELBO, paired over the same blocks and masks."""
    claim = "FP-MDLM beats its shallow twin in held-out NELBO (FP-MDLM − twin, nats/char, paired)"
    fp, twin = nelbo.get("FP-MDLM"), nelbo.get("shallow twin")
    if not (fp and twin and fp.get("rows") and twin.get("rows")):
        return {"claim": claim, "paper": "no twin in the paper", "ours": "n/a", "verdict": "not measured", "note": ""}
    d, lo, hi = paired_diff_ci(fp["rows"], twin["rows"])
    verdict_ = "holds" if hi < 0 else ("fails" if lo > 0 else "inconclusive")
    return {"claim": claim, "paper": "no twin in the paper", "ours": f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] "
            f"({fp['val_nelbo']:.4f} vs {twin['val_nelbo']:.4f})", "verdict": verdict_,
            "note": f"{len(fp['rows'])} block × mask draws"}


def _conversion_nelbo_claim(nelbo: dict) -> dict:
    claim = "the converted model's held-out NELBO within 5% of its teacher's"
    conv, teacher = nelbo.get("converted"), nelbo.get("MDLM")
    if not (conv and teacher):
        return {"claim": claim, "paper": "Table 8", "ours": "n/a", "verdict": "not measured", "note": ""}
    rel = conv["val_nelbo"] / teacher["val_nelbo"] - 1
    return {"claim": claim, "paper": "Table 8", "ours": f"{100 * rel:+.1f}% ({conv['val_nelbo']:.3f} vs "
            f"{teacher['val_nelbo']:.3f} nats/char)", "verdict": "holds" if rel <= 0.05 else "fails", "note": ""}


def _only_lowest(low, high) -> str:
    if not low or not high:
        return "not measured"
    better_low = low[0][1][2] < 1
    worse_high = high[0][1][1] > 1
    if better_low and worse_high:
        return "holds"
    if low[0][1][1] > 1 or high[0][1][2] < 1:
        return "fails"
    return "inconclusive"


def _collapse_claim(sweep: Sweep, logs: dict) -> dict:
    """Over-long consistency training collapses entropy; the 15% stop rule fires before."""
    long_log = [r for r in logs.get("cons-long", []) if "val_ppl" in r]
    base = next((r["val_ppl"] for r in long_log if r.get("event") == "pre_stage"), None)
    fire = next((r["step"] for r in long_log if base and r.get("event") != "pre_stage"
                 and r["val_ppl"] > 1.15 * base), None)
    ent = []
    for b in sweep.budgets:
        s, lg = sweep.get(*COFRE, budget=b), sweep.get("FP-MDLM + L_CONS (3x, no stop)", "3sr", budget=b)
        if s and lg:
            ent.append(f"B{b}: {s.entropy:.3f} → {lg.entropy:.3f}")
    last = long_log[-1] if long_log else {}
    ours = "n/a"
    if base:
        when = f"would fire at step {fire}" if fire is not None else "never fires"
        ours = (f"the stop rule {when} (pre-stage val PPL {base:.3f}, last "
                f"{last.get('val_ppl', math.nan):.3f} at step {last.get('step')}); sample entropy stopped → 3× run: "
                f"{', '.join(ent) or 'n/a'}")
    dropped = ent and all(float(e.split("→")[1]) < float(e.split(":")[1].split("→")[0]) - 0.02 for e in ent)
    verdict_ = "holds" if (dropped and fire is not None) else ("inconclusive" if ent else "not measured")
    return {"claim": "over-long consistency training collapses entropy; the 15% val-PPL stop rule catches it",
            "paper": "entropy collapses after +35k; rule picks +30k", "ours": ours, "verdict": verdict_, "note": ""}


def _match_claim(sweep: Sweep) -> dict:
    """The smallest budget at which CoFRe is no worse than MDLM's best (budget 768)."""
    if not sweep.budgets:
        return {"claim": "block passes CoFRe needs to match MDLM at 768", "paper": "< 1/8 (≤ 96)",
                "ours": "n/a", "verdict": "not measured", "note": ""}
    top = sweep.budgets[-1]
    ref = sweep.get("MDLM", "none", budget=top)
    match = None
    for b in sweep.budgets:
        p = sweep.get(*COFRE, budget=b)
        if p is not None and ref is not None and ratio_ci(p, ref)[0] <= 1.0:
            match = (b, ratio_ci(p, ref))
            break
    if match is None:
        ours, verdict_ = f"none up to {top}", "fails"
    else:
        ours = f"B{match[0]} ({match[0] / top:.3f} of {top}; ratio {_fmt(match[1])})"
        verdict_ = "holds" if match[0] <= top / 8 else "fails"
    return {"claim": f"CoFRe matches MDLM's budget-{top} quality with fewer than 1/8 of the block passes",
            "paper": "fewer than an eighth", "ours": ours, "verdict": verdict_,
            "note": "match = CoFRe's gen PPL at or below MDLM's (point estimate)"}


def _ratio_claims(nelbo: dict, times: dict) -> list[dict]:
    out = []
    m, f = nelbo.get("MDLM"), nelbo.get("FP-MDLM")
    if m and f:
        out.append({"claim": "fewer parameters (FP-MDLM / MDLM)", "paper": "0.612 (−38.8%)",
                    "ours": f"{f['params'] / m['params']:.3f} ({f['params']:,} / {m['params']:,})",
                    "verdict": "holds" if f["params"] < m["params"] else "fails", "note": ""})
        rel = f["val_nelbo"] / m["val_nelbo"] - 1
        out.append({"claim": "FP-MDLM's likelihood close to MDLM's (held-out NELBO, relative)",
                    "paper": "+5.5% (log val PPL 3.31 vs 3.14)", "ours": f"{100 * rel:+.1f}% "
                    f"({f['val_nelbo']:.3f} vs {m['val_nelbo']:.3f} nats/char)",
                    "verdict": "holds" if rel <= 0.05 else "fails", "note": "target: within 5%"})
    if "mdlm" in times and "fp" in times:
        r = times["fp"] / times["mdlm"]
        out.append({"claim": "cheaper training (time per step, FP-MDLM / MDLM, same load)", "paper": "0.885 (−11.5%)",
                    "ours": f"{r:.3f}", "verdict": "holds" if r < 1 else "fails", "note": "trained side by side"})
    return out


# ---------------------------------------------------------------------------------------------- report


def _points(out: Path) -> list[SweepPoint]:
    points = []
    for res in sorted((out / "sweep").glob("*/results.json")):
        points += [SweepPoint(**p) for p in json.loads(res.read_text())["points"]]
    for p in points:
        if (p.model, p.reuse, p.fp_schedule, p.fp_tol) == (*COFRE, None):
            p.extra["label"] = "CoFRe"
    return points


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _seconds_per_step(log: list[dict]) -> float:
    """Median wall time between consecutive training records (evaluation steps excluded)."""
    t = [(r["step"], r["time"]) for r in log if "loss" in r and "time" in r]
    gaps = sorted(b[1] - a[1] for a, b in zip(t, t[1:], strict=False) if b[0] == a[0] + 1)
    return gaps[len(gaps) // 2] if gaps else math.nan


def results_payload(out: Path, points: list[SweepPoint], nelbo: dict, entropies: dict, args) -> dict:
    models = {}
    for name, info in nelbo.items():
        tokens = _train_tokens(out, name, args)
        models[name] = {"val_nelbo": info["val_nelbo"], "params": info["params"], "baseline": name in BASELINES,
                        "train_tokens": tokens, "train_flops": _train_flops(out, name, nelbo, args)}
        if name == "shallow twin":
            models[name]["shallow_twin"] = True
        if "nelbo_by_iters" in info:
            models[name]["nelbo_by_iters"] = info["nelbo_by_iters"]
        if name == "converted":
            models[name]["teacher"] = "MDLM"
    sweep = [{"model": p.model, "reuse": p.reuse, "schedule": p.fp_schedule, "budget": p.budget,
              "steps": p.num_steps, "evaluator": p.evaluator, "gen_ppl": p.gen_ppl, "ci95": p.ci95,
              "entropy": p.entropy, "n_samples": p.n_samples, "status": "diverged" if p.status == "diverged" else "ok",
              "fp_tol": p.fp_tol, "block_passes": p.block_passes, "samples": _sample_name(p)}
             for p in best_per_budget(points)]
    return {"tokenizer": "character-level (Shakespeare symbols + [UNK], <|endoftext|>, [MASK])",
            "unigram_entropy": entropies["unigram_entropy"], "bigram_entropy": entropies["bigram_entropy"],
            "models": models, "sweep": sweep}


def _train_flops(out: Path, name: str, nelbo: dict, args) -> float:
    """Training FLOPs of a row, its earlier stages included (see `train_flops_per_token`): CoFRe adds the
    consistency stage to FP-MDLM's pretraining; the converted model adds its fine-tuning (student S-JFB plus a
    frozen-teacher forward) to the teacher's pretraining."""
    info = nelbo[name]
    if "config" not in info:
        return math.nan
    per_step = args.batch * args.seq_len
    cfg = info["config"]
    tokens = _train_tokens(out, name, args)
    if name.startswith("FP-MDLM + L_CONS"):
        pre = last_step(out / "fp" / "log.jsonl", default=args.steps) * per_step
        return pre * train_flops_per_token(cfg, args.seq_len) + (tokens - pre) * train_flops_per_token(
            cfg, args.seq_len, consistency=True)
    if name == "converted" and "config" in nelbo.get("MDLM", {}):
        teacher = nelbo["MDLM"]["config"]
        pre = _train_tokens(out, "MDLM", args)
        per_token = train_flops_per_token(cfg, args.seq_len) + train_flops_per_token(teacher, args.seq_len) / 3
        return pre * train_flops_per_token(teacher, args.seq_len) + (tokens - pre) * per_token
    return tokens * train_flops_per_token(cfg, args.seq_len)


def _sample_name(p: SweepPoint) -> str:
    """Where a point's decoded samples are published (docs/reproduction/samples/, gzipped JSONL)."""
    tol = "" if p.fp_tol is None else f"_tol{p.fp_tol:g}"
    return f"samples/{slug(p.model)}_{p.reuse}_{p.fp_schedule}{tol}_B{p.budget}_T{p.num_steps}.jsonl.gz"


def _publish_samples(points: list[SweepPoint], out: Path, docs: Path) -> None:
    """Every final point's decoded samples as gzipped JSONL (one {"text": ...} per line), written atomically;
    the two evaluators of a point share one file."""
    import gzip
    import os

    (docs / "samples").mkdir(parents=True, exist_ok=True)
    for p in best_per_budget(points):
        dest = docs / _sample_name(p)
        src = next((out / "sweep").glob(f"*/{p.samples_file}"), None) if p.samples_file else None
        if dest.is_file() or src is None:
            continue
        tmp = dest.with_suffix(".tmp")
        with gzip.GzipFile(tmp, "wb", mtime=0) as f:  # mtime 0: the same samples give the same bytes
            f.write(src.read_bytes())
        os.replace(tmp, dest)


def _train_tokens(out: Path, name: str, args) -> int:
    """Tokens seen in training, the stages before included (e.g. CoFRe = pretraining + consistency)."""
    per_step = args.batch * args.seq_len

    def run(sub: str, planned: int) -> int:  # the steps a run actually made (its log), else the planned ones
        return last_step(out / sub / "log.jsonl", default=planned)

    pre, mdlm = run("fp", args.steps), run("mdlm", args.steps)
    steps = {"MDLM": mdlm, "shallow twin": run("twin", args.steps), "FP-MDLM": pre,
             "FP-MDLM + L_CONS": pre + run("cons", args.cons_steps),
             "FP-MDLM + L_CONS (3x, no stop)": pre + run("cons-long", 3 * args.cons_steps),
             "converted": mdlm + args.conv_steps,
             "FP-MDLM, scratch (conversion steps)": run("fp-short", args.conv_steps)}
    return steps.get(name, 0) * per_step


def write_report(out: Path, docs: Path | None, args) -> None:
    points = _points(out)
    nelbo = json.loads((out / "nelbo.json").read_text()) if (out / "nelbo.json").is_file() else {}
    entropies = corpus_entropies(out / "tokenizer", args.seq_len)
    logs = {k: _log(out / k / "log.jsonl") for k in ("mdlm", "twin", "fp", "cons", "cons-long", "fp-short")}
    times = {k: _seconds_per_step(v) for k, v in logs.items() if v}
    payload = results_payload(out, points, nelbo, entropies, args)
    table = claims(Sweep(points), nelbo, times, logs)
    payload["claims"] = table
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "claims.json").write_text(json.dumps(table, indent=1))
    if docs is None:
        return
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    _publish_samples(points, out, docs)
    for i, evaluator in enumerate(("char-lm", "general")):
        plot(points, docs / f"quality_vs_budget_{evaluator}.png", evaluator=evaluator,
             title=f"Shakespeare (characters), {'in-domain char LM' if i == 0 else 'general LM'} evaluator")
    lm = {}
    for res in sorted((out / "sweep").glob("*/results.json")):
        lm.update(json.loads(res.read_text())["eval_lm"])
    for info in lm.values():  # no machine paths in a published report
        info["name"] = str(info["name"]).replace(str(ROOT_DIR) + "/", "")
    _write_readme(docs, out, args, payload, table, markdown_table(points, lm), times)


def _write_readme(docs, out, args, payload, table, sweep_md, times):
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    lines = [
        "# The paper's text claims at CPU scale (character-level Shakespeare)", "",
        f"Written by `bench/reproduce_text.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: "
        "the project's 2-core CPU; paired stages ran side by side with one thread each.", "",
        f"Corpus: {payload['unigram_entropy']:.3f} nats/char unigram entropy, {payload['bigram_entropy']:.3f} "
        "bigram conditional entropy.", "",
        "## Models", "", "| model | parameters | training tokens | training FLOPs | held-out NELBO (nats/char) "
        "| NELBO at 1 / 2 / 4 / 8 / 32 iterations |", "|---|---|---|---|---|---|",
        *[f"| {k} | {v['params']:,} | {v['train_tokens']:,} | {v['train_flops']:.2e} | {v['val_nelbo']:.4f} | "
          + (" / ".join(f"{v['nelbo_by_iters'][n]:.4f}" for n in ("1", "2", "4", "8", "32"))
             if "nelbo_by_iters" in v else "–") + " |" for k, v in payload["models"].items()], "",
        "Training FLOPs count block passes (`train_flops_per_token`): S-JFB runs on average 2 no-grad and 4.5 graph "
        "iterations of the shared block per step, so an FP-MDLM step costs more than its 3-block twin's.", "",
        *_contract_section(out, payload["models"]),
        *_depth_section(out, payload["models"]),
        "## Claims", "",
        "Ratios are generative-perplexity ratios under the in-domain character LM with 95% bootstrap intervals "
        "(below 1 = the first model is better); a claim holds when every interval is on its side of 1.", "",
        "| claim | paper | ours | verdict | note |", "|---|---|---|---|---|",
        *[f"| {c['claim']} | {c['paper']} | {c['ours']} | **{c['verdict']}** | {c.get('note', '')} |" for c in table],
        "",
        "## Sweep", "", sweep_md, "",
        "![in-domain evaluator](quality_vs_budget_char-lm.png)", "",
        "![general evaluator](quality_vs_budget_general.png)", "", "## Stages (commands, wall-clock time)", "",
        "| stage | threads | seconds | command |", "|---|---|---|---|"]
    for s in stages:
        cmd = " ".join(str(c).replace(str(ROOT_DIR) + "/", "") for c in s.get("cmd", []))
        lines.append(f"| {s['stage']} | {s.get('threads', '')} | {s['seconds']:.0f} | `{cmd}` |")
    lines += ["", "Seconds per training step (median, paired runs under the same load): "
              + ", ".join(f"{k} {v:.3f}" for k, v in times.items())]
    if (docs / "findings.md").is_file():
        lines += ["", (docs / "findings.md").read_text()]
    (docs / "README.md").write_text("\n".join(lines) + "\n")
    _write_samples(docs, out)


def _contract_section(out: Path, models: dict) -> list[str]:
    """The stability contract of every fixed-point model (OUT/contract/*.json), as markdown lines."""
    rows = []
    for name in models:
        path = out / "contract" / f"{slug(name)}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        worst32 = max(row["residual"]["32"] for row in r["profile"].values())
        growth = max(row["growth_per_iter"] for row in r["profile"].values())
        gen = " / ".join("ok" if r["generation"][m]["finite"] else "non-finite" for m in ("full", "3sr"))
        rows.append(f"| {name} | {worst32:.2g} | ×{growth:.4f} | {gen} | "
                    f"{'holds' if not r['failures'] else 'fails: ' + '; '.join(r['failures'])} |")
    if not rows:
        return []
    return ["## Stability contract", "",
            "`python -m fpmgm_hf.evaluation.stability MODEL` on 32 held-out blocks per mask rate "
            "(0.15 / 0.5 / 0.9; the worst "
            "rate shown) and `generate` at budget 768 with warm starts, safety net off (docs/stability).", "",
            "| model | residual @32 | growth / iter (32→64) | full / 3SR @768 | contract |", "|---|---|---|---|---|",
            *rows, ""]


def _depth_section(out: Path, models: dict) -> list[str]:
    """The start residuals of every fixed-point model (OUT/depth/*.json), as markdown lines."""
    rows = []
    for name in models:
        path = out / "depth" / f"{slug(name)}.json"
        if not path.is_file():
            continue
        starts = json.loads(path.read_text())["start_residuals"]
        order = sorted(starts, key=int)
        cells = [" / ".join(f"{starts[T][k]:.3g}" for k in ("h_pre", "3sr", "full")) for T in order]
        kls = [" / ".join(f"{starts[T].get('kl_' + k, math.nan):.3g}" for k in ("h_pre", "3sr", "full"))
               for T in order]
        rows.append(f"| {name} | " + " | ".join(cells + kls) + " |")
    if not rows:
        return []
    steps = sorted(json.loads(next((out / "depth").glob("*.json")).read_text())["start_residuals"], key=int)
    return ["## Depth profile: where each generation step starts", "",
            "`python -m fpmgm_hf.evaluation.depth MODEL`: median relative residual `||F(z0) − z0|| / ||z0||` of "
            "each step's first iteration (3SR trajectory, one iteration per step, first step excluded) from `h_pre` / "
            "the 3SR start / the previous fixed point (the paper's App. F.12: 76.7 from `h_pre`, 0.0385 with "
            "reuse). Then the mean KL(converged || one iteration) over masked positions from the same three starts: "
            "how far a step at one iteration samples from the fixed point's prediction.", "",
            "| model | " + " | ".join(f"residual T={T}" for T in steps) + " | "
            + " | ".join(f"KL T={T}" for T in steps) + " |", "|---|" + "---|" * (2 * len(steps)), *rows, ""]


def _write_samples(docs: Path, out: Path, per_point: int = 3) -> None:
    """docs/samples.md: the first samples of MDLM and CoFRe at the lowest, a middle and the top budget."""
    best = [p for p in best_per_budget(_points(out)) if p.evaluator == PRIMARY and p.samples_file]
    budgets = sorted({p.budget for p in best})
    if not budgets:
        return
    chosen = {budgets[0], budgets[len(budgets) // 2], budgets[-1]}
    lines = ["# Samples (the first three of each point; unconditional, 128 characters)", ""]
    for p in best:
        if p.budget not in chosen or (p.model, p.reuse) not in (("MDLM", "none"), COFRE[:2]):
            continue
        if p.model != "MDLM" and p.fp_schedule != "decreasing" or p.fp_tol is not None:
            continue
        path = next((out / "sweep").glob(f"*/{p.samples_file}"), None)
        if path is None:
            continue
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()[:per_point]]
        name = "CoFRe (3SR)" if p.model != "MDLM" else "MDLM"
        lines += [f"## {name}, budget {p.budget} (T={p.num_steps}, gen PPL {p.gen_ppl:.2f})", ""]
        lines += ["```text\n" + t.replace("<|endoftext|>", "⏎") + "\n```" for t in texts] + [""]
    (docs / "samples.md").write_text("\n".join(lines) + "\n")


ROOT_DIR = Path(__file__).resolve().parents[1]
