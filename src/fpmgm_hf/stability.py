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
