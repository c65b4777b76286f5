"""Solver convergence during sampling: relative residual vs iteration for picard / anderson x none / full /
3SR warm starts, averaged over the denoising steps after the first (the first step has nothing to reuse).

    python bench/solver_convergence.py --model outputs/demo/fp-mdlm --out bench/solver_convergence.png

Prints a table (median residual after 1, 2, 4, 8 iterations) and saves the plot.
"""

import argparse
import os
from pathlib import Path

import torch


def traces(model, solver, reuse, args):
    model.config.fp_solver = solver
    out = model.generate(
        batch_size=args.batch,
        seq_len=args.seq_len,
        num_steps=args.steps,
        fp_iters_per_step=args.iters,
        reuse=reuse,
        use_cache=False,
        output_solver_trace=True,
        generator=torch.Generator().manual_seed(0),
        return_dict_in_generate=True,
    )
    rows = [s["trace"] for s in out.step_stats[1:] if "trace" in s]
    return torch.cat(rows).nanmedian(dim=0).values  # (iters,)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a save_pretrained FP-MGM folder")
    p.add_argument("--seq-len", type=int, default=128, help="canvas length")
    p.add_argument("--batch", type=int, default=8, help="samples")
    p.add_argument("--steps", type=int, default=16, help="denoising steps")
    p.add_argument("--iters", type=int, default=16, help="iterations per step")
    p.add_argument("--out", default="bench/solver_convergence.png", help="plot path")
    args = p.parse_args()
    from fpmgm_hf import FPMGMForMaskedGeneration

    model = FPMGMForMaskedGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    results = {(s, r): traces(model, s, r, args) for s in ("picard", "anderson") for r in ("none", "full", "3sr")}
    marks = [i for i in (1, 2, 4, 8, 16) if i <= args.iters]
    print("| solver | reuse | " + " | ".join(f"it {i}" for i in marks) + " |")
    print("|---|---|" + "---|" * len(marks))
    for (solver, reuse), tr in results.items():
        print(f"| {solver} | {reuse} | " + " | ".join(f"{tr[i - 1]:.2e}" for i in marks) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (solver, reuse), tr in results.items():
        ax.plot(range(1, len(tr) + 1), tr, ls="-" if solver == "picard" else "--", label=f"{solver}, {reuse}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration within a denoising step")
    ax.set_ylabel("median relative residual")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, args.out)
    print("saved", args.out)


if __name__ == "__main__":
    main()
