"""Budget sweeps: sample from one or more models at several compute budgets and score the samples.

    fpmgm-eval sweep --model runs/mdlm/final runs/fp/final --budgets 96 192 384 768 \
        --reuse none full 3sr --num-samples 128 --pilot-samples 32 --seq-len 128 \
        --eval-lm gpt2-large runs/char-lm/final --out outputs/sweep
    fpmgm-eval train-lm --tokenizer runs/tokenizer --out runs/char-lm     # an in-domain evaluation LM

At each budget the best step count is chosen (as the paper does): every candidate of the step grid is sampled
with `--pilot-samples` samples and scored by the first evaluation LM, and the winner is sampled again with
`--num-samples` samples and scored by every evaluation LM, with a 95% bootstrap interval over samples. Writes
`results.json`, `results.md`, `quality_vs_budget*.png` (one per evaluator) and the decoded samples
(`samples/*.jsonl`); `points.jsonl` makes an interrupted sweep resume. Reports say whether an evaluation LM is
comparable to published numbers (the offline fallback LM is not).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ..scheduling_fpmgm import FP_SCHEDULES
from .sweep_report import (  # noqa: F401  (re-exported: the public names of the sweep)
    SweepPoint,
    best_per_budget,
    bootstrap_ci,
    markdown_table,
    plot,
    write_reports,
)


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

    from ..data import auto_tokenizer

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=trust_remote_code, dtype=torch.float32)
    return model.to(device).eval(), auto_tokenizer(model_dir, trust_remote_code)


def generate_samples(model, num_samples: int, seq_len: int, batch_size: int, seed: int, **gen_kwargs):
    """`num_samples` unconditional canvases; returns (LongTensor (N, L), mean block passes). With
    `return_stats=True` also the share of solves the safety net stopped or restarted."""
    return_stats = gen_kwargs.pop("return_stats", False)
    g = torch.Generator(device=model.device).manual_seed(seed)
    seqs, passes, trips, solves = [], [], 0, 0
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        out = model.generate(batch_size=n, seq_len=seq_len, generator=g, return_dict_in_generate=True, **gen_kwargs)
        seqs.append(out.sequences.cpu())
        passes.append(out.block_passes.float().cpu())
        for step in out.step_stats:
            ran = step["ran"]
            trips += int(((step["diverged"] | step["cold_start"]) & ran).sum())
            solves += int(ran.sum())
    result = (torch.cat(seqs), torch.cat(passes).mean().item())
    return (*result, trips / max(solves, 1)) if return_stats else result


def score(sequences, tokenizer, eval_lm, eval_tok, batch_size: int = 8, seed: int = 0) -> dict:
    """Generative perplexity (with its bootstrap interval), pooled perplexity and unigram entropy."""
    from .metrics import generative_perplexity, unigram_entropy

    texts = tokenizer.batch_decode(sequences, skip_special_tokens=False)
    ppl = generative_perplexity(texts, eval_lm, eval_tok, batch_size=batch_size)
    return {
        "gen_ppl": float(ppl["gen_ppl"]),
        "pooled_ppl": float(ppl["pooled_ppl"]),
        "ci95": bootstrap_ci(ppl["per_sample_nll"], seed=seed),
        "per_sample_nll": [round(float(v), 5) for v in ppl["per_sample_nll"]],
        "entropy": float(unigram_entropy(sequences).mean()),
        "texts": texts,
    }


def _evaluators(args, device) -> dict:
    """label -> (model, tokenizer, info) for every `--eval-lm`."""
    from .metrics import load_eval_lm

    labels = args.eval_lm_names or args.eval_lm
    if len(labels) != len(args.eval_lm):
        raise ValueError(f"--eval-lm-names needs one label per --eval-lm ({len(args.eval_lm)}), got {len(labels)}.")
    lms = {}
    for label, spec in zip(labels, args.eval_lm, strict=True):
        lm, tok, info = load_eval_lm(spec, trust_remote_code=getattr(args, "trust_remote_code", False))
        lms[label] = (lm.to(device), tok, info)
    return lms


def run_sweep(args) -> tuple[list[SweepPoint], dict]:
    from tqdm.auto import tqdm

    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    lms = _evaluators(args, device)
    lm_info = {label: info for label, (_, _, info) in lms.items()}
    points, done = [], _resume(out)
    for i, model_dir in enumerate(args.model):
        model, tokenizer = _load(model_dir, device, getattr(args, "trust_remote_code", False))
        name = _label(model_dir, args.names, i)
        reuse_modes = args.reuse if model.config.num_fp_layers else ["none"]
        schedules = args.fp_schedule if model.config.num_fp_layers else args.fp_schedule[:1]
        tols = args.fp_tol if model.config.num_fp_layers else [None]
        jobs = [(r, s, tol, b) for r in reuse_modes for s in schedules for tol in tols for b in args.budgets]
        for reuse, sched, tol, budget in tqdm(jobs, desc=name):
            setting = _Setting(name, reuse, sched, tol, budget)
            points += _budget_points(model, tokenizer, lms, args, out, done, setting)
    write_reports(points, out, lm_info, vars(args))
    return points, lm_info


class _Setting:
    def __init__(self, model, reuse, schedule, tol, budget):
        self.model, self.reuse, self.schedule, self.tol, self.budget = model, reuse, schedule, tol, budget

    def key(self, steps, n, evaluator, args) -> str:
        tol = "" if self.tol is None else f"|tol{self.tol:g}"
        return (f"{self.model}|{self.reuse}|{self.schedule}{tol}|{self.budget}|{steps}|n{n}|L{args.seq_len}"
                f"|s{args.seed}|{evaluator}")


def _budget_points(model, tokenizer, lms, args, out, done, setting) -> list[SweepPoint]:
    """Pilot points for every step-count candidate (when there are several), then the winner with the full
    sample count under every evaluator."""
    grid = step_grid(model.config, setting.budget, tuple(args.fp_iters))
    first = next(iter(lms))
    points = []
    if len(grid) > 1 and args.pilot_samples:
        pilots = [_point(model, tokenizer, {first: lms[first]}, args, out, done, setting, t, args.pilot_samples)[0]
                  for t in grid]
        for p in pilots:
            p.status = "pilot" if p.status == "ok" else p.status
        points += pilots
        grid = [min(pilots, key=lambda p: (math.isnan(p.gen_ppl), p.gen_ppl)).num_steps]
    for steps in grid:
        points += _point(model, tokenizer, lms, args, out, done, setting, steps, args.num_samples)
    return points


def _point(model, tokenizer, lms, args, out, done, setting, steps, n) -> list[SweepPoint]:
    """Sample one setting once and score it with each evaluator (resumed points are read back). A solver that
    meets a non-finite iterate (strict models, `fp_divergence_patience=None`) gives `diverged` points."""
    keys = {label: setting.key(steps, n, label, args) for label in lms}
    if all(k in done for k in keys.values()):
        return [done[k] for k in keys.values()]
    where = (setting.model, setting.reuse, setting.schedule, setting.budget, steps)
    common = dict(evaluator="", n_samples=n, fp_tol=setting.tol)
    t0 = time.perf_counter()
    try:
        seqs, passes, trips = generate_samples(
            model, n, args.seq_len, args.batch_size, args.seed, budget=setting.budget, num_steps=steps,
            reuse=setting.reuse, fp_schedule=setting.schedule, fp_tol=setting.tol, sampler="ancestral",
            use_cache=True, return_stats=True)
    except FloatingPointError as err:
        nan = float("nan")
        result = []
        for label, key in keys.items():
            p = SweepPoint(*where, nan, nan, nan, nan, time.perf_counter() - t0, "", {"diverged": str(err)[:300]},
                           **dict(common, evaluator=label), status="diverged")
            _append_jsonl(out / "points.jsonl", {"key": key, **asdict(p)})
            result.append(p)
        return result
    seconds = time.perf_counter() - t0
    result = []
    for label, (lm, lm_tok, _) in lms.items():
        scores = score(seqs, tokenizer, lm, lm_tok, seed=args.seed)
        sample_file = "samples/" + re.sub(r"[^A-Za-z0-9.+=-]+", "_", keys[label]) + ".jsonl"
        _write_jsonl(out / sample_file, scores.pop("texts"))
        p = SweepPoint(*where, scores["gen_ppl"], scores["pooled_ppl"], scores["entropy"], passes, seconds,
                       sample_file, {"safety_net_share": trips, "per_sample_nll": scores["per_sample_nll"]},
                       **dict(common, evaluator=label),
                       ci95=scores["ci95"])
        _append_jsonl(out / "points.jsonl", {"key": keys[label], **asdict(p)})
        result.append(p)
    return result


def _write_jsonl(path: Path, texts: list[str]) -> None:
    from .sweep_report import atomic_text

    atomic_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


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
    sw.add_argument(
        "--fp-tol",
        nargs="+",
        type=lambda v: None if v == "none" else float(v),
        default=[None],
        help="FP models: adaptive-stopping tolerances to sweep ('none' = fixed iterations)",
    )
    sw.add_argument("--num-samples", type=int, default=32, help="samples per final point")
    sw.add_argument(
        "--pilot-samples",
        type=int,
        default=0,
        help="samples per step-count candidate when choosing the step count (0: every candidate gets --num-samples)",
    )
    sw.add_argument("--seq-len", type=int, default=128, help="sample length in tokens")
    sw.add_argument("--batch-size", type=int, default=16, help="samples per generate call")
    sw.add_argument(
        "--eval-lm",
        nargs="+",
        default=["gpt2-large"],
        help="causal LM(s) for generative perplexity, Hub ids or folders (offline: gpt2-large falls back "
        "explicitly to SmolLM2); the first one chooses the step count",
    )
    sw.add_argument("--eval-lm-names", nargs="+", help="labels of the evaluation LMs (default: as given)")
    sw.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every point)")
    sw.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    sw.add_argument("--out", default="outputs/sweep", help="output folder (re-runs resume from points.jsonl)")
    sw.add_argument("--trust-remote-code", action="store_true",
                    help="UNSAFE: let the --model folders and the --eval-lm models run their own code (without it, "
                         "such code is refused, never asked about)")
    from .reference_lm import build_parser as reference_lm_parser

    reference_lm_parser(sub.add_parser("train-lm", help="train an in-domain causal LM to score samples with"))
    return parser


def check_sweep_args(args) -> None:
    """Impossible values, each refused naming its flag (a sweep over nothing would end with an empty report)."""
    from ..scheduling_fpmgm import MAX_BUDGET

    for name in ("num_samples", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.pilot_samples < 0:
        raise ValueError(f"--pilot-samples must be >= 0, got {args.pilot_samples}.")
    bad = [b for b in args.budgets if not 1 <= b <= MAX_BUDGET]
    if bad:
        raise ValueError(f"--budgets must be block-pass counts in [1, {MAX_BUDGET}], got {bad}.")
    bad = [n for n in args.fp_iters if n < 1]
    if bad:
        raise ValueError(f"--fp-iters must be iteration counts >= 1, got {bad}.")
    bad = [t for t in args.fp_tol if t is not None and not t > 0]
    if bad:
        raise ValueError(f"--fp-tol must be 'none' or tolerances > 0, got {bad}.")
    if args.names and len(args.names) != len(args.model):
        raise ValueError(f"--names needs one label per --model ({len(args.model)}), got {len(args.names)}.")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train-lm":
        from .reference_lm import train_reference_lm

        print(train_reference_lm(args))
        return 0
    for path in args.model:
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"--model {path!r} is not a save_pretrained folder (no config.json).")
    check_sweep_args(args)
    from ..training.runlock import folder_lock

    with folder_lock(args.out):  # one writer per output folder, whichever tool it is
        points, lm_info = run_sweep(args)
    print(markdown_table(points, lm_info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
