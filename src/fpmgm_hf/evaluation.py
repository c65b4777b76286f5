"""Budget sweeps: sample from one or more models at several compute budgets and score the samples.

    fpmgm-eval sweep --model runs/mdlm/final runs/fp/final --budgets 96 192 384 768 \
        --reuse none full 3sr --num-samples 32 --seq-len 128 --out outputs/sweep

At each budget the best operating point over a grid of step counts is kept (as the paper does); every
tried point is stored too. Writes `results.json`, `results.md`, `quality_vs_budget.png` and the decoded
samples (`samples/*.jsonl`). Reports carry the evaluation LM and whether it is comparable to published
numbers (the offline fallback LM is not).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .scheduling_fpmgm import FP_SCHEDULES


@dataclass
class SweepPoint:
    model: str
    reuse: str
    fp_schedule: str
    budget: int
    num_steps: int
    gen_ppl: float
    pooled_ppl: float
    entropy: float
    block_passes: float
    seconds: float
    samples_file: str = ""
    extra: dict = field(default_factory=dict)


def step_grid(config, budget: int, iters: tuple[int, ...] = (1, 2, 4, 8)) -> list[int]:
    """Step counts worth trying at `budget`: one per average iteration count for FP models, budget // layers
    for an explicit stack."""
    k_pre, k_fp, k_post = config.num_pre_layers, config.num_fp_layers, config.num_post_layers
    if k_fp == 0:
        return [budget // (k_pre + k_post)]
    steps = {budget // (k_pre + k_post + n * k_fp) for n in iters}
    return sorted(t for t in steps if t >= 1)


def _label(model_dir: str, names: Optional[list], i: int) -> str:
    return names[i] if names and i < len(names) else Path(model_dir.rstrip("/")).parent.name or Path(model_dir).name


def _load(model_dir: str, device, trust_remote_code: bool = False):
    """Model and tokenizer of a folder. Without `trust_remote_code` no code from the folder runs: the model
    class is fpmgm_hf's own (registered with AutoModel) and a tokenizer needing its own code is refused."""
    from transformers import AutoModel

    from .data import auto_tokenizer

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=trust_remote_code, dtype=torch.float32)
    return model.to(device).eval(), auto_tokenizer(model_dir, trust_remote_code)


def generate_samples(model, num_samples: int, seq_len: int, batch_size: int, seed: int, **gen_kwargs):
    """`num_samples` unconditional canvases; returns (LongTensor (N, L), mean block passes)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    seqs, passes = [], []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        out = model.generate(batch_size=n, seq_len=seq_len, generator=g, return_dict_in_generate=True, **gen_kwargs)
        seqs.append(out.sequences.cpu())
        passes.append(out.block_passes.float().cpu())
    return torch.cat(seqs), torch.cat(passes).mean().item()


def score(sequences, tokenizer, eval_lm, eval_tok, batch_size: int = 8) -> dict:
    from .metrics import generative_perplexity, unigram_entropy

    texts = tokenizer.batch_decode(sequences, skip_special_tokens=False)
    ppl = generative_perplexity(texts, eval_lm, eval_tok, batch_size=batch_size)
    return {
        "gen_ppl": float(ppl["gen_ppl"]),
        "pooled_ppl": float(ppl["pooled_ppl"]),
        "entropy": float(unigram_entropy(sequences).mean()),
        "texts": texts,
    }


def run_sweep(args) -> tuple[list[SweepPoint], dict]:
    from tqdm.auto import tqdm

    from .metrics import load_eval_lm

    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    eval_lm, eval_tok, lm_info = load_eval_lm(args.eval_lm)
    eval_lm.to(device)
    points, done = [], _resume(out)
    for i, model_dir in enumerate(args.model):
        model, tokenizer = _load(model_dir, device, getattr(args, "trust_remote_code", False))
        name = _label(model_dir, args.names, i)
        reuse_modes = args.reuse if model.config.num_fp_layers else ["none"]
        jobs = [
            (r, s, b, t)
            for r in reuse_modes
            for s in args.fp_schedule
            for b in args.budgets
            for t in step_grid(model.config, b, tuple(args.fp_iters))
        ]
        for reuse, sched, budget, steps in tqdm(jobs, desc=name):
            key = f"{name}|{reuse}|{sched}|{budget}|{steps}|n{args.num_samples}|L{args.seq_len}|s{args.seed}"
            if key in done:
                points.append(done[key])
                continue
            where = (name, reuse, sched, budget, steps)
            point = _run_point(model, tokenizer, (eval_lm, eval_tok), args, out, key, where)
            points.append(point)
            _append_jsonl(out / "points.jsonl", {"key": key, **asdict(point)})
    write_reports(points, out, lm_info, vars(args))
    return points, lm_info


def _run_point(model, tokenizer, lm, args, out: Path, key: str, where: tuple) -> SweepPoint:
    """Sample and score one (model, reuse, schedule, budget, steps) point. A solver that meets non-finite
    iterates (a non-contractive shared block, see FPMGMConfig.fp_state_norm) gives a `diverged` point (NaN
    scores) instead of ending the sweep."""
    name, reuse, sched, budget, steps = where
    t0 = time.perf_counter()
    try:
        seqs, passes = generate_samples(model, args.num_samples, args.seq_len, args.batch_size, args.seed,
                                        budget=budget, num_steps=steps, reuse=reuse, fp_schedule=sched,
                                        sampler="ancestral", use_cache=True)
    except FloatingPointError as err:
        nan = float("nan")
        return SweepPoint(*where, nan, nan, nan, nan, time.perf_counter() - t0, "", {"diverged": str(err)[:300]})
    seconds = time.perf_counter() - t0
    scores = score(seqs, tokenizer, *lm)
    sample_file = "samples/" + re.sub(r"[^A-Za-z0-9.+=-]+", "_", key) + ".jsonl"
    _write_jsonl(out / sample_file, scores.pop("texts"))
    return SweepPoint(*where, scores["gen_ppl"], scores["pooled_ppl"], scores["entropy"], passes, seconds,
                      sample_file)


def _rank(p: SweepPoint) -> tuple:
    return (math.isnan(p.gen_ppl), p.gen_ppl)  # diverged points lose to any finite one


def best_per_budget(points: list[SweepPoint]) -> list[SweepPoint]:
    """The lowest-gen-PPL step count for every (model, reuse, schedule, budget); diverged points only where
    every step count diverged."""
    best: dict[tuple, SweepPoint] = {}
    for p in points:
        key = (p.model, p.reuse, p.fp_schedule, p.budget)
        if key not in best or _rank(p) < _rank(best[key]):
            best[key] = p
    return sorted(best.values(), key=lambda p: (p.model, p.reuse, p.fp_schedule, p.budget))


def markdown_table(points: list[SweepPoint], lm_info: dict) -> str:
    rows = best_per_budget(points)
    budgets = sorted({p.budget for p in rows})
    lines = [
        f"Generative perplexity / unigram entropy; evaluation LM `{lm_info.get('name')}`"
        + (
            ""
            if lm_info.get("comparable_to_published")
            else " (offline stand-in: NOT comparable with published numbers)"
        )
        + "; best step count per budget in brackets.",
        "",
        "| model | reuse | schedule | " + " | ".join(f"B{b}" for b in budgets) + " |",
        "|---|---|---|" + "---|" * len(budgets),
    ]
    configs = sorted({(p.model, p.reuse, p.fp_schedule) for p in rows})
    for cfg in configs:
        cells = []
        for b in budgets:
            hit = [p for p in rows if (p.model, p.reuse, p.fp_schedule) == cfg and p.budget == b]
            cells.append(_cell(hit[0]) if hit else "—")
        lines.append(f"| {cfg[0]} | {cfg[1]} | {cfg[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(p: SweepPoint) -> str:
    if math.isnan(p.gen_ppl):
        return f"diverged [T={p.num_steps}]"
    return f"{p.gen_ppl:.1f} / {p.entropy:.2f} [T={p.num_steps}]"


def plot(points: list[SweepPoint], path: Path, title: str = "") -> Optional[Path]:
    """Quality vs budget (one line per model/config), entropy beside it. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = best_per_budget(points)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for cfg in sorted({(p.model, p.reuse, p.fp_schedule) for p in rows}):
        pts = sorted((p for p in rows if (p.model, p.reuse, p.fp_schedule) == cfg), key=lambda p: p.budget)
        label = (
            cfg[0]
            if cfg[1] == "none" and len({q.reuse for q in rows if q.model == cfg[0]}) == 1
            else f"{cfg[0]} ({cfg[1]}, {cfg[2]})"
        )
        ax1.plot([p.budget for p in pts], [p.gen_ppl for p in pts], marker="o", label=label)
        ax2.plot([p.budget for p in pts], [p.entropy for p in pts], marker="o", label=label)
    for ax, ylabel in ((ax1, "generative perplexity (lower is better)"), (ax2, "unigram entropy (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (transformer-block passes per sample)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if any(p.gen_ppl > 0 for p in rows):  # NaN (diverged) compares False
        ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_reports(points, out: Path, lm_info: dict, settings: dict) -> None:
    payload = {
        "eval_lm": lm_info,
        "settings": {k: v for k, v in settings.items() if k != "func"},
        "points": [asdict(p) for p in points],
        "best": [asdict(p) for p in best_per_budget(points)],
    }
    _atomic_text(out / "results.json", json.dumps(payload, indent=2))
    _atomic_text(out / "results.md", markdown_table(points, lm_info))
    plot(points, out / "quality_vs_budget.png", title=f"eval LM: {lm_info.get('name')}")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_jsonl(path: Path, texts: list[str]) -> None:
    _atomic_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _resume(out: Path) -> dict:
    """Points finished by an interrupted sweep (`points.jsonl`), so a re-run only does what is missing."""
    done = {}
    path = out / "points.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            key = rec.pop("key")
            done[key] = SweepPoint(**rec)
    return done


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpmgm-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sw = sub.add_parser("sweep", help="generate and score samples over budgets, reuse modes and schedules")
    sw.add_argument("--model", nargs="+", required=True, help="save_pretrained folders (with tokenizer files)")
    sw.add_argument("--names", nargs="+", help="labels for the models (default: folder names)")
    sw.add_argument("--budgets", nargs="+", type=int, default=[96, 192, 384, 768], help="block-pass budgets")
    sw.add_argument(
        "--reuse",
        nargs="+",
        default=["none", "full", "3sr"],
        choices=["none", "full", "3sr"],
        help="warm-start modes for FP models (explicit stacks always use none)",
    )
    sw.add_argument(
        "--fp-schedule",
        nargs="+",
        default=["decreasing"],
        choices=list(FP_SCHEDULES),
        help="iteration allocations across steps",
    )
    sw.add_argument(
        "--fp-iters",
        nargs="+",
        type=int,
        default=[1, 2, 4, 8],
        help="FP models: mean iterations per step to try at each budget (each gives a step count)",
    )
    sw.add_argument("--num-samples", type=int, default=32, help="samples per point")
    sw.add_argument("--seq-len", type=int, default=128, help="sample length in tokens")
    sw.add_argument("--batch-size", type=int, default=16, help="samples per generate call")
    sw.add_argument(
        "--eval-lm",
        default="gpt2-large",
        help="causal LM for generative perplexity (offline: falls back explicitly to SmolLM2)",
    )
    sw.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every point)")
    sw.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    sw.add_argument("--out", default="outputs/sweep", help="output folder (re-runs resume from points.jsonl)")
    sw.add_argument("--trust-remote-code", action="store_true", help="UNSAFE: let the --model folders run their code")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for path in args.model:
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"--model {path!r} is not a save_pretrained folder (no config.json).")
    if args.num_samples < 1 or args.seq_len < 1:
        raise ValueError("--num-samples and --seq-len must be >= 1.")
    points, lm_info = run_sweep(args)
    print(markdown_table(points, lm_info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
