"""Sampling at a real vocabulary: wall time of `generate`, FP-MDLM / MDLM at equal budget and each model's own step
count, the share of the time spent outside transformer-block passes, and peak memory (issue 27).

    python bench/sampling_speed.py                                   # vocab 50258, width 768, length 256
    python bench/sampling_speed.py --length 1024 --batch 8 --budgets 96 --memory-only

Random-weight models (timings do not depend on the weights). MDLM is 12/0/0 and FP-MDLM 1/1/1 (the default map,
3SR); a second, identical MDLM is timed in the same rotation (A/A: this run's noise floor). Calls are interleaved
with the order rotated each round (`generate_speed.timed_pair`). Time inside block passes is measured with
forward hooks on the blocks; the rest (embedding, head, sampler, bookkeeping) is "outside". Peak memory: each
model's `generate` in its own process, the peak RSS it adds over the process after building the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import timed_pair  # noqa: E402

STEPS = {  # budget -> (MDLM steps, FP-MDLM steps): the reproduction sweep's picks (docs/reproduction)
    96: (8, 32),
    384: (32, 96),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--vocab", type=int, default=50258)
    a("--hidden", type=int, default=768)
    a("--heads", type=int, default=12)
    a("--length", type=int, default=256)
    a("--batch", type=int, nargs="+", default=[1, 8])
    a("--budgets", type=int, nargs="+", default=[96, 384])
    a("--repeats", type=int, default=2, help="timed calls per model and setting (median)")
    a("--threads", type=int, default=1)
    a("--memory-only", action="store_true", help="only the peak-memory measurement")
    a("--steps", type=int, nargs=2, default=None, metavar=("MDLM", "FP"),
      help="step counts of both models at every budget (default: the reproduction sweep's picks, STEPS)")
    a("--before-src", default=None,
      help="also measure memory with the fpmgm_hf package found in this src folder (e.g. a worktree of an older "
           "commit), to report before/after")
    a("--json", default=None, help="also write the results here")
    a("--_memory", nargs=4, default=None, help=argparse.SUPPRESS)  # child: kind batch budget steps
    return p.parse_args(argv)


def build(args, kind: str, seed: int = 0):
    from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration

    layers = dict(num_pre_layers=12, num_fp_layers=0, num_post_layers=0) if kind == "mdlm" else {}
    torch.manual_seed(seed)
    config = FPMGMConfig(vocab_size=args.vocab, mask_token_id=args.vocab - 1, hidden_size=args.hidden,
                         num_attention_heads=args.heads, cond_dim=128, max_position_embeddings=args.length,
                         dropout=0.0, **layers)
    return FPMGMForMaskedGeneration(config).eval()


class BlockClock:
    """Seconds spent inside the model's transformer blocks (forward hooks)."""

    def __init__(self, model):
        self.seconds, self._t0 = 0.0, None
        blocks = [*model.model.pre_blocks, *model.model.fp_blocks, *model.model.post_blocks]
        self._handles = [h for b in blocks for h in (b.register_forward_pre_hook(self._start),
                                                      b.register_forward_hook(self._stop))]

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._t0


def timing(args) -> list[dict]:
    rows = []
    models = [build(args, "mdlm"), build(args, "fp"), build(args, "mdlm", seed=1)]
    clocks = [BlockClock(m) for m in models]
    for batch in args.batch:
        for budget in args.budgets:
            t_m, t_f = _steps(args, budget)
            kw = [dict(budget=budget, num_steps=t_m), dict(budget=budget, num_steps=t_f, reuse="3sr"),
                  dict(budget=budget, num_steps=t_m)]
            for c in clocks:
                c.seconds = 0.0
            run = argparse.Namespace(batch=batch, length=args.length)
            times, outs = timed_pair(models, run, args.repeats, kw)
            calls = args.repeats + 1  # the block clocks also saw the warm-up round
            inside = [c.seconds / calls for c in clocks]
            row = {"batch": batch, "budget": budget, "steps": [t_m, t_f], "seconds": times,
                   "fp_over_mdlm": times[1] / times[0], "aa": times[2] / times[0],
                   "outside_share": [max(0.0, 1 - i / t) for i, t in zip(inside, times, strict=True)],
                   "block_passes": [float(o.block_passes.float().mean()) for o in outs]}
            rows.append(row)
            print(f"batch {batch}, B{budget}: MDLM {times[0]:.2f} s ({t_m} steps), FP-MDLM {times[1]:.2f} s "
                  f"({t_f} steps), FP/MDLM {row['fp_over_mdlm']:.3f}, A/A {row['aa']:.3f}, outside the blocks "
                  f"{100 * row['outside_share'][0]:.0f}% / {100 * row['outside_share'][1]:.0f}%", flush=True)
    return rows


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(args) -> None:
    kind, batch, budget, steps = args._memory
    model = build(args, kind)
    base = _rss_mb()
    model.generate(batch_size=int(batch), seq_len=args.length, budget=int(budget), num_steps=int(steps),
                   generator=torch.Generator().manual_seed(0))
    import fpmgm_hf

    print(json.dumps({"added_mb": _rss_mb() - base, "package": str(Path(fpmgm_hf.__file__).parent)}))


def _steps(args, budget: int) -> tuple[int, int]:
    if args.steps:
        return tuple(args.steps)
    if budget not in STEPS:
        raise SystemExit(f"--budgets: no step counts for budget {budget}; valid: {sorted(STEPS)} or pass --steps")
    return STEPS[budget]


def memory(args) -> list[dict]:
    rows = []
    versions = [("", None)] + ([("before_", args.before_src)] if args.before_src else [])
    for batch in args.batch:
        for budget in args.budgets:
            row = {"batch": batch, "budget": budget, "steps": list(_steps(args, budget))}
            for prefix, src in versions:
                env = dict(os.environ, PYTHONPATH=src) if src else None
                for kind, steps in zip(("mdlm", "fp"), _steps(args, budget), strict=True):
                    cmd = [sys.executable, __file__, "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                           "--heads", str(args.heads), "--length", str(args.length), "--_memory", kind, str(batch),
                           str(budget), str(steps)]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                    child = json.loads(out.stdout.strip().splitlines()[-1])
                    row[prefix + kind], row[prefix + "package"] = child["added_mb"], child["package"]
                print(f"{'before: ' if prefix else ''}batch {batch}, length {args.length}, B{budget}: generate adds "
                      f"{row[prefix + 'mdlm']:.0f} MB (MDLM) / {row[prefix + 'fp']:.0f} MB (FP-MDLM) to the process",
                      flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory:
        return memory_child(args)
    print(f"vocab {args.vocab}, width {args.hidden}, {args.heads} heads, length {args.length}, "
          f"{torch.get_num_threads()} thread(s)")
    result = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "json"}}
    if not args.memory_only:
        result["timing"] = timing(args)
    result["memory"] = memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
