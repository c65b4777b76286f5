"""`torch.compile` and `generate`: first-call and steady-state wall time, eager against two ways of compiling, and
how many graphs each way compiles as the budget and reuse change (issue 27, item 5).

    python bench/compile_speed.py                          # width 256, length 128, batch 8, vocab 1024, 1 thread
    python bench/compile_speed.py --hidden 768 --heads 12 --length 256 --vocab 50258 --batch 1

Ways (each on a fresh copy of the same random-weight model, `torch._dynamo` reset in between):
  eager    no compilation
  blocks   `model.compile_repeated_blocks()`: each transformer block compiled on its own (regional compilation). The
           blocks share one class and one input shape, so one graph serves every block and every iteration of the
           shared block; the solver, the sampler and the step loop stay eager.
  model    `model.model.compile()`: the whole backbone, solver loop included, as a user would first try it.

For each way: the first `generate` call (compilation included), the median of `--repeats` further calls at the same
settings (steady state), then one call per extra setting (budgets, reuse) and the graphs compiled along the way.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import build  # noqa: E402

WAYS = ("eager", "blocks", "model")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--hidden", type=int, default=256)
    a("--heads", type=int, default=4)
    a("--length", type=int, default=128)
    a("--batch", type=int, default=8)
    a("--vocab", type=int, default=1024)
    a("--budget", type=int, default=96, help="budget of the first and steady-state calls")
    a("--steps", type=int, default=32, help="denoising steps of those calls (FP-MDLM's best at B96)")
    a("--extra-budgets", type=int, nargs="*", default=[24, 384], help="one call each after the steady state")
    a("--repeats", type=int, default=3)
    a("--threads", type=int, default=1)
    a("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    a("--kind", default="fp", choices=["fp", "mdlm"], help="FP-MDLM 1/1/1 (3SR) or MDLM 12/0/0")
    return p.parse_args(argv)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _call(model, args, budget, steps, seed):
    kw = dict(reuse="3sr") if args.kind == "fp" else {}
    t0 = time.perf_counter()
    model.generate(batch_size=args.batch, seq_len=args.length, budget=budget, num_steps=steps,
                   generator=torch.Generator().manual_seed(seed), **kw)
    return time.perf_counter() - t0


def measure(base, args, way: str) -> dict:
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = copy.deepcopy(base)
    if way == "blocks":
        model.compile_repeated_blocks()
    elif way == "model":
        model.model.compile()
    first = _call(model, args, args.budget, args.steps, 0)
    graphs_first = _graphs()
    steady = statistics.median(_call(model, args, args.budget, args.steps, r + 1) for r in range(args.repeats))
    extra = {}
    for budget in args.extra_budgets:
        steps = max(1, round(args.steps * budget / args.budget))
        extra[budget] = _call(model, args, budget, steps, 99)
    return {"way": way, "first_s": first, "steady_s": steady, "extra_s": extra, "graphs_first": graphs_first,
            "graphs_total": _graphs(), "graph_breaks": int(sum(counters["graph_break"].values()))}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = dict(num_pre_layers=12, num_fp_layers=0, num_post_layers=0) if args.kind == "mdlm" else {}
    base = build(args, **layers)
    print(f"{args.kind}: width {args.hidden}, length {args.length}, batch {args.batch}, vocab {args.vocab}, "
          f"B{args.budget} at {args.steps} steps, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    rows = [measure(base, args, way) for way in args.ways]
    eager = next((r for r in rows if r["way"] == "eager"), None)
    print("| way | first call s | steady s | steady / eager | graphs after 1st call | graphs after extra budgets "
          "| graph breaks |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['steady_s'] / eager['steady_s']:.3f}" if eager else "-"
        print(f"| {r['way']} | {r['first_s']:.2f} | {r['steady_s']:.3f} | {ratio} | {r['graphs_first']} | "
              f"{r['graphs_total']} | {r['graph_breaks']} |")
    return rows


if __name__ == "__main__":
    main()
