"""Does the shared block's fixed point do work? An ablation of fixed-point maps at equal training steps, each
against its shallow twin, on character-level Shakespeare (issue 23; docs/depth).

    .venv/bin/python bench/fp_depth.py                         # every variant; re-run to resume
    .venv/bin/python bench/fp_depth.py --variants twin default --steps 40 --out /tmp/d   # toy

Every variant is trained by `fpmgm-train` exactly as bench/reproduce_text.py trains FP-MDLM (width 128, 4 heads,
128-character blocks, batch 32, lr 1e-3, the same tokenizer, held-out split and seed), resumably, then measured:
- the depth profile (`python -m fpmgm_hf.evaluation.depth`): held-out NELBO after 1..32 iterations from `h_pre`,
  KL(converged || n iterations), and the relative residual at each generation step's start from `h_pre`, the 3SR
  mix and the previous fixed point;
- the shared block's share of the work: `||block(u) - u|| / ||u||` at the fixed point (median over tokens), beside
  the same ratio for the pre and post blocks;
- the stability contract (`python -m fpmgm_hf.evaluation.stability`): residual <= 1e-3 after 32 iterations, growth
  <= x1.005 per iteration, finite full / 3SR generation at budget 768;
- training seconds per step (median of the logged steps) and block passes per training step.
The shallow twin is a plain MDLM with as many explicit blocks as the FP model has distinct blocks (3/0/0 for
1/1/1), trained identically. Results: OUT/<variant>/depth.json, and the table in --docs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro_claims import FLOP_FIELDS, train_flops_per_token  # noqa: E402
from reproduce_text import done, run, stage_tokenizer, train_cmd  # noqa: E402

CONSTRAINED = dict(injection="constrained", fp_decay_init=0.5, fp_state_norm=False)  # every row names its map
SHALLOW = dict(fp_residual_reg_iters=0, fp_residual_reg_tol=0.0, fp_residual_reg_prob=1.0)  # at the last S-JFB step
VARIANTS = {  # name -> (layers, config fields, description)
    "twin": ((3, 0, 0), {}, "shallow twin: MDLM with 3 explicit blocks"),
    "penalty-1": ((1, 1, 1), {**CONSTRAINED, **SHALLOW, "fp_residual_reg": 1.0},
                  "constrained, residual penalty 1.0 (the old default)"),
    "penalty-0.1": ((1, 1, 1), {**CONSTRAINED, **SHALLOW, "fp_residual_reg": 0.1},
                    "constrained, residual penalty 0.1"),
    "no-penalty": ((1, 1, 1), dict(CONSTRAINED, fp_residual_reg=0.0),
                   "constrained, no penalty (the paper's objective)"),
    "deep-penalty": ((1, 1, 1), dict(CONSTRAINED, fp_residual_reg=1.0, fp_residual_reg_iters=12,
                                     fp_residual_reg_tol=2e-3, fp_residual_reg_prob=0.5),
                     "**constrained, residual penalty 12 iterations past S-JFB, hinged at 2e-3, half the steps (the "
                     "default)**"),
    "decay-0.8": ((1, 1, 1), dict(CONSTRAINED, fp_decay_init=0.8, fp_residual_reg=0.0),
                  "constrained with A0 = 0.8, no penalty"),
    "paper+norm": ((1, 1, 1), dict(injection="concat_mlp", fp_state_norm=True, fp_residual_reg=0.0),
                   "the paper's concat-MLP map + state LayerNorm, no penalty"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default="outputs/depth", help="working folder (models, per-variant JSON); re-runs resume")
    a("--docs", default="docs/depth", help="where README.md and results.json go ('' = nowhere)")
    a("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    a("--steps", type=int, default=1500, help="training steps of every variant")
    a("--hidden", type=int, default=128)
    a("--heads", type=int, default=4)
    a("--seq-len", type=int, default=128)
    a("--batch", type=int, default=32)
    a("--lr", type=float, default=1e-3)
    a("--gen-steps", type=int, nargs="+", default=[8, 32, 96],
      help="step counts of the start-residual generations (the sweep's picks at B24 / B96 / B384)")
    a("--threads", type=int, default=1, help="threads of each training run and of the measurements")
    a("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- measure


@torch.no_grad()
def block_shares(model, blocks: torch.Tensor, rate: float = 0.5, fp_iters: int = 32, seed: int = 0) -> dict:
    """Median over tokens of `||block(u) - u|| / ||u||` for each block at a converged solve (the shared block's
    value is at its last iteration): how much each block changes the residual stream."""
    from fpmgm_hf.evaluation.stability import masked_canvases

    shares: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, out):
            u = args[0]
            shares[name] = ((out - u).norm(dim=-1) / u.norm(dim=-1).clamp_min(1e-12)).flatten()
        return record

    inner = model.model
    named = [(f"{kind}{i}", b) for kind, blocks in (("pre", inner.pre_blocks), ("fp", inner.fp_blocks),
                                                  ("post", inner.post_blocks)) for i, b in enumerate(blocks)]
    handles = [b.register_forward_hook(hook(n)) for n, b in named]
    try:
        x = masked_canvases(blocks, rate, model.config.mask_token_id, torch.Generator().manual_seed(seed))
        model.eval()(x, fp_iters=fp_iters, fp_tol=0)
    finally:
        for h in handles:
            h.remove()
    return {name: float(v.median()) for name, v in shares.items()}


def seconds_per_step(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "loss" in r and "event" not in r]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.median(gaps) if gaps else float("nan")


def measure(name: str, args, out: Path) -> dict:
    from fpmgm_hf import FPMGMForMaskedGeneration
    from fpmgm_hf.data import load_texts, load_training_tokenizer, pack_blocks, split_blocks
    from fpmgm_hf.evaluation.depth import depth_profile, nelbo_by_iters
    from fpmgm_hf.evaluation.stability import measure_contract

    layers, fields, description = VARIANTS[name]
    folder = out / name / "final"
    model = FPMGMForMaskedGeneration.from_pretrained(folder).eval()
    tok = load_training_tokenizer(str(out / "tokenizer"))
    _, val = split_blocks(pack_blocks(load_texts("shakespeare"), tok, args.seq_len), 0.05)
    result = {"variant": name, "description": description, "layers": list(layers), "fields": fields,
              "params": sum(p.numel() for p in model.parameters()), "steps": args.steps,
              "sec_per_step": seconds_per_step(out / name), "shares": block_shares(model, val[:32], seed=args.seed),
              "train_flops_per_token": train_flops_per_token({k: getattr(model.config, k) for k in FLOP_FIELDS},
                                                             args.seq_len)}
    if model.config.num_fp_layers:
        result["depth"] = depth_profile(model, val, seq_len=args.seq_len, steps=args.gen_steps, seed=args.seed)
        result["contract"] = measure_contract(model, val[:32], seq_len=args.seq_len, seed=args.seed)
        inj = model.model.injection
        if getattr(inj, "kind", None) == "constrained":
            A = inj.decay().detach().float()
            result["decay_quantiles"] = [float(q) for q in torch.quantile(A, torch.tensor([0.0, 0.5, 1.0]))]
    else:
        result["depth"] = {"nelbo": nelbo_by_iters(model, val[:128], (1,), seed=args.seed)[1]}
    return result


# ----------------------------------------------------------------------------------------------- report


def _fmt(x, spec=".4f"):
    return "–" if x is None or x != x else format(x, spec)


def flops(r: dict) -> float:
    """Training FLOPs per token of a row (`repro_claims.train_flops_per_token`), from its config as trained."""
    if "train_flops_per_token" in r:
        return r["train_flops_per_token"]
    from fpmgm_hf import FPMGMConfig

    layers, fields, _ = VARIANTS[r["variant"]]
    config = FPMGMConfig(hidden_size=128, num_attention_heads=4, cond_dim=64, vocab_size=89, mask_token_id=88,
                         num_pre_layers=layers[0], num_fp_layers=layers[1], num_post_layers=layers[2], **fields)
    return train_flops_per_token({k: getattr(config, k) for k in FLOP_FIELDS}, 128)


def table(results: list[dict]) -> str:
    twin = next((r for r in results if r["variant"] == "twin"), None)
    twin_nelbo = twin["depth"]["nelbo"] if twin else None
    lines = ["| variant | params | NELBO @1 | @32 | @1 − @32 | @32 − twin | shared block's share (pre / fp / post) "
             "| start residual h_pre / 3SR / full (T=32) | contract | training FLOPs / token (× twin) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        nelbo = r["depth"].get("nelbo_by_iters", {"1": r["depth"].get("nelbo"), "32": r["depth"].get("nelbo")})
        n1, n32 = nelbo["1"], nelbo["32"]
        shares = " / ".join(f"{v:.3f}" for v in r["shares"].values())  # pre, fp, post (insertion order)
        starts = r["depth"].get("start_residuals", {}).get("32")
        starts = " / ".join(_fmt(starts[k], ".3g") for k in ("h_pre", "3sr", "full")) if starts else "–"
        contract = "–" if "contract" not in r else ("holds" if not r["contract"]["failures"] else
                                                    f"fails ({len(r['contract']['failures'])})")
        gap = None if twin_nelbo is None else n32 - twin_nelbo
        label = VARIANTS[r["variant"]][2] if r["variant"] in VARIANTS else r["description"]
        lines.append(f"| {label} | {r['params']:,} | {_fmt(n1)} | {_fmt(n32)} | {_fmt(n1 - n32, '+.4f')} "
                     f"| {_fmt(gap, '+.4f')} | {shares} | {starts} | {contract} | {flops(r) / 1e6:.1f}M "
                     f"(×{flops(r) / flops(twin):.2f}) |" if twin else "")
    return "\n".join(lines)


def write_docs(results: list[dict], args, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    body = ["# Does the fixed point do work? (depth ablation)", "",
            f"Written by `python bench/fp_depth.py --steps {args.steps}`. Character-level Shakespeare, width "
            f"{args.hidden}, {args.seq_len}-character blocks, batch {args.batch}, lr {args.lr:g}, {args.steps} steps "
            "per variant with `fpmgm-train`, one thread each. NELBO: held-out nats/char, 128 blocks × 2 mask draws, "
            "the same masks for every row and iteration count. '@32 − twin': below 0 the FP model beats its shallow "
            "twin. Share: median `||block(u) − u|| / ||u||` per block at a 32-iteration solve (mask rate 0.5). Start "
            "residual: median relative residual of the first iteration of each generation step (3SR trajectory, "
            "32 steps, one iteration per step, first step excluded) from each start.", "",
            table(results), "", "Every measurement (all iteration counts, KL per mask rate, all step counts, the "
            "contract's details) is in [results.json](results.json)."]
    if (docs / "findings.md").is_file():
        body += ["", (docs / "findings.md").read_text()]
    (docs / "README.md").write_text("\n".join(body) + "\n")
    (docs / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stage_tokenizer(args, out)
    results = []
    for name in args.variants:
        path = out / name / "depth.json"
        if not path.is_file():
            layers, fields, _ = VARIANTS[name]
            if not done(out / name / "final"):
                run(train_cmd(args, out, name, args.steps, layers=layers, fields=fields), out, f"train-{name}",
                    args.threads)
            print(f"[depth] measuring {name}", flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(measure(name, args, out), indent=1))
            os.replace(tmp, path)
        results.append(json.loads(path.read_text()))
        print(table(results[-1:]), flush=True)
    if args.docs:
        write_docs(results, args, Path(args.docs))
    return results


if __name__ == "__main__":
    main()
