"""Is the learned map a fixed-point map? Measurements behind the stability contract (docs/stability).

For a trained FP-MGM and held-out clean blocks:
- `solver_profile`: canvases masked at given rates, solved from `h_pre` with the safety net off; per
  sample the relative residual after k iterations and the state's growth per iteration between two depths;
- `generation_check`: `generate` with warm starts (full / 3SR) at a large budget with the safety net off, so a
  non-finite iterate is an error instead of being caught;
- `check_contract`: the thresholds of the contract applied to both.

The raw map is measured (`fp_divergence_patience=None` for the duration of a call, restored afterwards): the
safety net would otherwise hide exactly what is being measured.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

CONTRACT = {"residual_at_32": 1e-3, "growth_per_iter": 1.005}


@contextlib.contextmanager
def raw_map(model):
    """Run `model` with the solver's safety net off (non-finite iterates raise), then restore the config."""
    saved = model.config.fp_divergence_patience
    model.config.fp_divergence_patience = None
    try:
        yield model
    finally:
        model.config.fp_divergence_patience = saved


def masked_canvases(blocks: Tensor, rate: float, mask_id: int, generator: torch.Generator) -> Tensor:
    """Mask each token of `blocks (B, L)` independently with probability `rate` (at least one per row)."""
    masked = torch.rand(blocks.shape, generator=generator) < rate
    first = torch.rand(blocks.shape, generator=generator).argmin(1)  # (B,)
    masked[torch.arange(blocks.shape[0]), first] = True
    return torch.where(masked, torch.full_like(blocks, mask_id), blocks)


def _median(values: Tensor) -> float:
    values = values[~torch.isnan(values)]
    return float(values.median()) if values.numel() else float("nan")


@torch.no_grad()
def solver_profile(model, blocks: Tensor, *, rates: Sequence[float] = (0.15, 0.5, 0.9),
                   depths: Sequence[int] = (8, 32, 64), seed: int = 0) -> dict:
    """Median relative residual after each of `depths` iterations and the median growth per iteration of the
    state between the last two depths, per mask rate. `blocks (B, L)` are clean held-out tokens.

    Returns `{rate: {"residual": {k: r}, "growth_per_iter": g, "nonfinite": bool}}`; a map whose iterates
    overflow reports `nonfinite=True`, infinite growth and NaN residuals."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    lo, hi = depths[-2], depths[-1]
    out = {}
    with raw_map(model):
        for rate in rates:
            x = masked_canvases(blocks, rate, model.config.mask_token_id, g).to(device)
            t = torch.full((x.shape[0],), float(rate), device=device)
            try:
                deep = model(x, timesteps=t, fp_iters=hi, fp_tol=0, fp_trace=True)
                mid = model(x, timesteps=t, fp_iters=lo, fp_tol=0)
            except FloatingPointError:
                out[rate] = {"residual": {k: math.nan for k in depths}, "growth_per_iter": math.inf, "nonfinite": True}
                continue
            trace = deep.solver_stats.trace.float().cpu()  # (B, hi): residual of each iteration
            norm_hi = deep.fixed_point.float().flatten(1).norm(dim=1).cpu()
            norm_lo = mid.fixed_point.float().flatten(1).norm(dim=1).cpu()
            growth = (norm_hi / norm_lo.clamp_min(1e-30)).pow(1.0 / (hi - lo))
            out[rate] = {"residual": {k: _median(trace[:, k - 1]) for k in depths},
                         "growth_per_iter": _median(growth), "nonfinite": False}
    return out


@torch.no_grad()
def generation_check(model, *, seq_len: int, budget: int = 768, reuse_modes=("full", "3sr"), batch_size: int = 4,
                     num_steps: Optional[int] = None, seed: int = 0) -> dict:
    """`generate` at `budget` with each reuse mode and the safety net off. Returns
    `{mode: {"finite": bool, "median_final_residual": float, "error": str | None}}`."""
    out = {}
    with raw_map(model):
        for mode in reuse_modes:
            g = torch.Generator().manual_seed(seed)
            try:
                res = model.generate(batch_size=batch_size, seq_len=seq_len, budget=budget, num_steps=num_steps,
                                     reuse=mode, use_cache=False, generator=g, return_dict_in_generate=True)
            except FloatingPointError as err:
                out[mode] = {"finite": False, "median_final_residual": math.nan, "error": str(err)[:200]}
                continue
            residuals = torch.stack([s["residual"] for s in res.step_stats])  # (T, B)
            out[mode] = {"finite": True, "median_final_residual": _median(residuals.flatten()), "error": None}
    return out


def check_contract(profile: dict, generation: dict) -> list[str]:
    """The contract's failures (empty when it holds): residual after 32 iterations, growth between 32 and 64,
    and finite warm-started generation."""
    failures = []
    for rate, row in profile.items():
        r32 = row["residual"].get(32, math.nan)
        if not r32 <= CONTRACT["residual_at_32"]:
            failures.append(f"mask rate {rate}: median residual after 32 iterations {r32:.3g} > 1e-3")
        if not row["growth_per_iter"] <= CONTRACT["growth_per_iter"]:
            failures.append(f"mask rate {rate}: state growth x{row['growth_per_iter']:.4f} per iteration > x1.005")
    for mode, row in generation.items():
        if not row["finite"]:
            failures.append(f"generate(reuse={mode!r}): {row['error']}")
    return failures


def measure_contract(model, blocks: Tensor, *, seq_len: int, budget: int = 768, seed: int = 0) -> dict:
    """Everything the contract looks at for one model, on held-out clean `blocks (B, L)`: the solver profile,
    the warm-started generation check, and the failures (empty when the contract holds)."""
    profile = solver_profile(model, blocks, seed=seed)
    generation = generation_check(model, seq_len=seq_len, budget=budget, seed=seed)
    return {"profile": {str(k): v for k, v in profile.items()}, "generation": generation,
            "failures": check_contract(profile, generation)}


def add_model_arguments(p) -> None:
    """The arguments every per-model measurement CLI shares: the model, its held-out text and the seed."""
    p.add_argument("model", help="a saved FP-MGM folder (or Hub id)")
    p.add_argument("--data", default="shakespeare", help="held-out text: a bundled corpus or .txt/.jsonl files")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--seq-len", type=int, default=None, help="block length (default: the model's positions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the measurement to this file")


def fp_model_and_heldout(p, args, what: str):
    """`(model, held-out blocks (N, seq_len), seq_len)` for `add_model_arguments`' args: the last 5% of --data's
    blocks, the split training uses. A model without a fixed-point block is refused (`what` says what is missing)."""
    from ..data import load_blocks, load_training_tokenizer, split_blocks
    from ..modeling_fpmgm import FPMGMForMaskedGeneration

    if args.seq_len is not None and args.seq_len < 1:
        p.error(f"--seq-len must be >= 1, got {args.seq_len}")
    model = FPMGMForMaskedGeneration.from_pretrained(args.model).eval()
    if model.config.num_fp_layers == 0:
        p.error(f"{args.model!r} has no fixed-point block (num_fp_layers=0): {what}")
    seq_len = args.seq_len or model.config.max_position_embeddings
    tok = load_training_tokenizer(args.tokenizer or args.model)
    _, val = split_blocks(load_blocks(args.data, tok, seq_len), 0.05)
    return model, val, seq_len


def write_json(path, payload: dict) -> None:
    """`payload` as JSON at `path`, written atomically (a killed run leaves no half-written file)."""
    import json

    from ..data.assets import atomic_write

    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)


def main(argv=None) -> int:
    """`python -m fpmgm_hf.evaluation.stability MODEL`: does a trained FP-MGM keep the stability contract?
    Exit 1 if not."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    add_model_arguments(p)
    p.add_argument("--blocks", type=int, default=32, help="held-out blocks per mask rate")
    p.add_argument("--budget", type=int, default=768, help="budget of the warm-started generate check")
    args = p.parse_args(argv)
    if args.blocks < 1:
        p.error(f"--blocks must be >= 1, got {args.blocks}")
    model, val, seq_len = fp_model_and_heldout(p, args, "nothing to check")
    result = measure_contract(model, val[: args.blocks], seq_len=seq_len, budget=args.budget, seed=args.seed)
    for rate, row in result["profile"].items():
        res = " / ".join(f"{row['residual'][k]:.2g}" for k in sorted(row["residual"], key=int))
        print(f"mask rate {rate}: residual @8/32/64 {res}, growth x{row['growth_per_iter']:.4f} per iteration")
    for mode, row in result["generation"].items():
        print(f"generate(reuse={mode!r}, budget={args.budget}): {'finite' if row['finite'] else row['error']}")
    print("contract holds" if not result["failures"] else "contract FAILS:\n  " + "\n  ".join(result["failures"]))
    if args.json:
        write_json(args.json, result)
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
