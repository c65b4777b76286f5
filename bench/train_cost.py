"""Training cost on CPU: FP-MDLM (1/1/1 blocks, the default map: constrained injection + residual penalty,
S-JFB) vs MDLM (12/0/0) at the same width and sequence length. Each model runs in its own subprocess so peak
memory (ru_maxrss) is its own.

    python bench/train_cost.py --hidden 256 --heads 4 --seq-len 128 --batch 8

A step is one MDLM NELBO forward + backward + AdamW update on random tokens. FP-MDLM's cost varies with the
S-JFB draws (no-grad U{0..4}, graph U{3..6} iterations by default); the mean drawn count is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = {
    "fp-mdlm": dict(num_pre_layers=1, num_fp_layers=1, num_post_layers=1),
    "mdlm": dict(num_pre_layers=12, num_fp_layers=0, num_post_layers=0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="Model width D.")
    p.add_argument("--heads", type=int, default=4, help="Attention heads.")
    p.add_argument("--cond", type=int, default=128, help="Conditioning width.")
    p.add_argument("--vocab", type=int, default=50258, help="Vocabulary size (GPT-2 + [MASK]).")
    p.add_argument("--seq-len", type=int, default=128, help="Tokens per sequence.")
    p.add_argument("--batch", type=int, default=8, help="Sequences per step.")
    p.add_argument("--steps", type=int, default=10, help="Timed steps.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed warm-up steps.")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice).")
    p.add_argument("--worker", choices=sorted(MODELS), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> dict:
    import torch

    from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration
    from fpmgm_hf.training.objectives import mdlm_nelbo

    if args.threads:
        torch.set_num_threads(args.threads)
    base_rss = _rss_mib()
    torch.manual_seed(0)
    config = FPMGMConfig(vocab_size=args.vocab, mask_token_id=args.vocab - 1, hidden_size=args.hidden,
                         num_attention_heads=args.heads, cond_dim=args.cond, dropout=0.0,
                         max_position_embeddings=max(1024, args.seq_len), **MODELS[args.worker])
    model = FPMGMForMaskedGeneration(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, args.vocab - 1, (args.batch, args.seq_len), generator=g)
    times, iters = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss, aux = mdlm_nelbo(model, x0, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            iters.append(float(aux["output"].solver_stats.iterations.float().mean()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    n_params = sum(p.numel() for p in model.parameters())
    n_blocks = sum(p.numel() for n, p in model.named_parameters() if "blocks" in n or "injection" in n)
    return {"model": args.worker, "params": n_params, "block_params": n_blocks,
            "step_s_median": statistics.median(times), "step_s_mean": statistics.fmean(times),
            "fp_iters_mean": statistics.fmean(iters),
            "peak_rss_mib": peak, "peak_minus_start_mib": peak - base_rss, "threads": torch.get_num_threads()}


def run_child(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(rows: dict, args) -> None:
    print(f"width {args.hidden}, heads {args.heads}, seq {args.seq_len}, batch {args.batch}, vocab {args.vocab}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, threads {rows['mdlm']['threads']}")
    print(f"{'model':8s} {'params':>11s} {'block params':>13s} {'step s (med)':>13s} {'step s (mean)':>14s} "
          f"{'FP iters':>9s} {'peak RSS MiB':>13s} {'peak-start MiB':>15s}")
    for r in rows.values():
        print(f"{r['model']:8s} {r['params']:>11,d} {r['block_params']:>13,d} {r['step_s_median']:>13.4f} "
              f"{r['step_s_mean']:>14.4f} {r['fp_iters_mean']:>9.2f} {r['peak_rss_mib']:>13.1f} "
              f"{r['peak_minus_start_mib']:>15.1f}")
    fp, md = rows["fp-mdlm"], rows["mdlm"]
    print("ratios FP-MDLM / MDLM: "
          f"params {fp['params'] / md['params']:.3f}, block params {fp['block_params'] / md['block_params']:.3f}, "
          f"step time (median) {fp['step_s_median'] / md['step_s_median']:.3f}, "
          f"peak RSS {fp['peak_rss_mib'] / md['peak_rss_mib']:.3f}, "
          f"peak-start {fp['peak_minus_start_mib'] / md['peak_minus_start_mib']:.3f}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = {name: run_child(name, argv) for name in ("mdlm", "fp-mdlm")}
    report(rows, args)


if __name__ == "__main__":
    main()
