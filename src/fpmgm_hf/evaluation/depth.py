"""Does the fixed point do work? The depth profile of a trained FP-MGM (docs/reproduction, issue 23).

Three measurements, each on held-out clean blocks:
- `nelbo_by_iters`: held-out MDLM NELBO (nats/token) after n iterations from `h_pre`, the same times and masks
  for every n. If n = 1 is as good as n = 32, the iterations buy nothing;
- `logit_kl_by_iters`: KL(converged || n iterations) of the SUBS output distribution over masked positions,
  at several mask rates (how far n iterations are from the converged output, per token);
- `start_residuals`: in real generation (ancestral sampler, 3SR trajectory), the relative residual
  `||F(z0) - z0|| / ||z0||` at each step's *start* for three starts of the same step: `h_pre` (no reuse),
  the 3SR mix, and the previous step's fixed point (full reuse). The paper's App. F.12 reports 76.7 from
  `h_pre` against 0.0385 with reuse (medians, first step excluded): a warm start can only pay when the first
  number is large.

    python -m fpmgm_hf.evaluation.depth MODEL [--data shakespeare] [--steps 8 32 96] [--json depth.json]

The raw map is measured (the solver's safety net off, as in `evaluation.stability`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..fixed_point_fpmgm import WarmStart
from ..training.objectives import mdlm_nelbo
from .stability import _median, masked_canvases, raw_map

Tensor = torch.Tensor

ITERS = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def nelbo_rows(model, blocks: Tensor, fp_iters: int = 8, *, batch_size: int = 32, draws: int = 2,
               seed: int = 0) -> Tensor:
    """Per-block held-out NELBO (nats/token) of `blocks (N, L)` after `fp_iters` iterations from `h_pre`, for
    `draws` mask draws: `(draws * N,)` float64, draw-major. The times and masks depend only on `seed`, the
    batch and the draw, so every model and iteration count sees the same ones (paired comparisons). Raises
    `FloatingPointError` when the iterates overflow (safety net off)."""
    from ..training.objectives import subs_token_nll

    model.eval()
    device, mask_id = next(model.parameters()).device, model.config.mask_token_id
    rows = []
    with raw_map(model):
        for draw in range(draws):
            for start in range(0, blocks.shape[0], batch_size):
                g = torch.Generator().manual_seed(seed + 1_000_003 * draw + start)
                x0 = blocks[start:start + batch_size].to(device)
                _, aux = mdlm_nelbo(model, x0, generator=g, model_kwargs={"fp_iters": fp_iters, "fp_tol": 0})
                nll = subs_token_nll(aux["output"].logits, aux["z"], x0, mask_id)  # (B, L)
                rows.append((nll.double() / aux["t"].double()[:, None]).mean(1).cpu())  # (B,) the NELBO's weight
    return torch.cat(rows)


def nelbo_by_iters(model, blocks: Tensor, iters: Sequence[int] = ITERS, *, batch_size: int = 32, draws: int = 2,
                   seed: int = 0) -> dict[int, float]:
    """Held-out NELBO (nats/token) of `blocks (N, L)` after each of `iters` iterations from `h_pre`, `draws` mask
    draws per block, the same times and masks for every n (see `nelbo_rows`). NaN where the iterates overflow."""
    out = {}
    for n in iters:
        try:
            out[n] = float(nelbo_rows(model, blocks, n, batch_size=batch_size, draws=draws, seed=seed).mean())
        except FloatingPointError:
            out[n] = math.nan
    return out


def _subs_logp(logits: Tensor, mask_id: int) -> Tensor:
    """log-softmax over the vocabulary with the mask token excluded, (N, V) float64."""
    logits = logits.double()
    logits[..., mask_id] = -math.inf
    return torch.log_softmax(logits, -1)


@torch.no_grad()
def logit_kl_by_iters(model, blocks: Tensor, iters: Sequence[int] = ITERS, *, rates=(0.15, 0.5, 0.9),
                      converged: int = 64, reference=None, seed: int = 0) -> dict[float, dict[int, float]]:
    """Mean KL(p_ref || p_n) over the masked positions of `blocks` masked at each rate, nats per token: `p_ref`
    is `model` after `converged` iterations (the fixed point), or `reference`'s output (e.g. a conversion's MDLM
    teacher: how far the student is from it after n iterations)."""
    model.eval()
    device, mask_id = next(model.parameters()).device, model.config.mask_token_id
    g = torch.Generator().manual_seed(seed)
    out = {}
    with raw_map(model):
        for rate in rates:
            x = masked_canvases(blocks, rate, mask_id, g).to(device)  # (N, L)
            t = torch.full((x.shape[0],), float(rate), device=device)
            masked = x == mask_id
            try:
                ref_out = reference(x, timesteps=t) if reference is not None else model(
                    x, timesteps=t, fp_iters=converged, fp_tol=0)
                ref = _subs_logp(ref_out.logits[masked], mask_id)
                row = {}
                for n in iters:
                    logp = _subs_logp(model(x, timesteps=t, fp_iters=n, fp_tol=0).logits[masked], mask_id)
                    kl = (ref.exp() * (ref - logp)).nan_to_num(0.0).sum(-1)  # (N_masked,); 0 * log 0 = 0
                    row[n] = float(kl.mean())
            except FloatingPointError:
                row = {n: math.nan for n in iters}
            out[rate] = row
    return out


class _CallRecorder:
    """Forward hooks on the denoiser body (`model.model`, which `generate` calls; the output head runs apart) that
    keep every call of a `generate` run: inputs, warm start and fixed point."""

    def __init__(self, model):
        self.calls: list[dict] = []
        body = model.model
        self._handles = [body.register_forward_pre_hook(self._pre, with_kwargs=True),
                         body.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        self.calls.append({"input_ids": ids, "timesteps": kwargs.get("timesteps"),
                           "attention_mask": kwargs.get("attention_mask"),
                           "class_labels": kwargs.get("class_labels"), "init": kwargs.get("fixed_point_init")})

    def _post(self, module, args, kwargs, output):
        self.calls[-1]["fixed_point"] = output.fixed_point

    def remove(self):
        for h in self._handles:
            h.remove()


def _replay(model, call: dict, init, iters: int = 1):
    """A recorded call run again for `iters` iterations from `init` (None = h_pre)."""
    return model(call["input_ids"], timesteps=call["timesteps"], attention_mask=call["attention_mask"],
                 class_labels=call["class_labels"], fixed_point_init=init, fp_iters=iters, fp_tol=0, fp_trace=True)


def _first_step(model, call: dict, init, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Relative residual of the first iteration from `init` per row (B,), and KL(ref || SUBS output after that
    one iteration) per masked position (N_masked,): how far one iteration from this start is from the fixed
    point's prediction, which is what a step at one iteration samples from."""
    out = _replay(model, call, init)
    masked = call["input_ids"] == model.config.mask_token_id
    logp = _subs_logp(out.logits[masked], model.config.mask_token_id)
    kl = (ref.exp() * (ref - logp)).nan_to_num(0.0).sum(-1)
    return out.solver_stats.trace[:, 0].float().cpu(), kl.float().cpu()


@torch.no_grad()
def start_residuals(model, *, seq_len: int, steps: Sequence[int] = (8, 32, 96), budget_per_step: int = 3,
                    batch_size: int = 8, seed: int = 0, converged: int = 64,
                    **generate_kwargs) -> dict[int, dict[str, float]]:
    """Median relative residual at each step's start in real generation, first step excluded (App. F.12).

    For each step count T: `generate` with 3SR, `budget = budget_per_step * T` (3 = one iteration per step
    for a 1/1/1 model) and the cache off; every recorded call t >= 1 is then replayed for one iteration from
    `h_pre`, from the 3SR start it used, and from the previous call's fixed point. Returns
    `{T: {"h_pre": r, "3sr": r, "full": r, "kl_h_pre": k, "kl_3sr": k, "kl_full": k}}`: median residuals, and the
    mean KL(converged || one iteration from that start) over masked positions (`converged` iterations from h_pre)."""
    model.eval()
    out = {}
    with raw_map(model):
        for T in steps:
            recorder = _CallRecorder(model)
            try:
                model.generate(batch_size=batch_size, seq_len=seq_len, num_steps=T, budget=budget_per_step * T,
                               reuse="3sr", use_cache=False, generator=torch.Generator().manual_seed(seed),
                               **generate_kwargs)
            finally:
                recorder.remove()
            found = {k: [] for k in ("h_pre", "3sr", "full", "kl_h_pre", "kl_3sr", "kl_full")}
            for prev, call in zip(recorder.calls, recorder.calls[1:], strict=False):
                if prev["fixed_point"].shape != call["input_ids"].shape + prev["fixed_point"].shape[-1:]:
                    continue  # a row finished early: the batches no longer line up
                if not isinstance(call["init"], WarmStart):
                    continue
                masked = call["input_ids"] == model.config.mask_token_id
                ref = _subs_logp(_replay(model, call, None, converged).logits[masked], model.config.mask_token_id)
                for name, init in (("h_pre", None), ("3sr", call["init"]), ("full", prev["fixed_point"])):
                    residual, kl = _first_step(model, call, init, ref)
                    found[name].append(residual)
                    found["kl_" + name].append(kl)
            out[T] = {k: (_median(torch.cat(v)) if k in ("h_pre", "3sr", "full") else float(torch.cat(v).mean()))
                      if v else math.nan for k, v in found.items()}
    return out


def depth_profile(model, blocks: Tensor, *, seq_len: int, steps: Sequence[int] = (8, 32, 96),
                  iters: Sequence[int] = ITERS, nelbo_blocks: int = 128, kl_blocks: int = 32,
                  seed: int = 0) -> dict:
    """All three measurements on held-out clean `blocks (N, L)`, as one JSON-ready dict."""
    nelbo = nelbo_by_iters(model, blocks[:nelbo_blocks], iters, seed=seed)
    kl = logit_kl_by_iters(model, blocks[:kl_blocks], iters, seed=seed)
    starts = start_residuals(model, seq_len=seq_len, steps=steps, seed=seed)
    return {"nelbo_by_iters": {str(k): v for k, v in nelbo.items()},
            "kl_to_converged": {str(r): {str(k): v for k, v in row.items()} for r, row in kl.items()},
            "start_residuals": {str(T): row for T, row in starts.items()},
            "nelbo_blocks": min(nelbo_blocks, blocks.shape[0]), "kl_blocks": min(kl_blocks, blocks.shape[0])}


def format_profile(profile: dict) -> str:
    """A few readable lines of a `depth_profile` result."""
    nelbo = profile["nelbo_by_iters"]
    lines = ["held-out NELBO by iterations: " + ", ".join(f"{k}: {v:.4f}" for k, v in nelbo.items())]
    for rate, row in profile["kl_to_converged"].items():
        lines.append(f"KL(converged || n) at mask rate {rate}: " + ", ".join(f"{k}: {v:.3g}" for k, v in row.items()))
    for T, row in profile["start_residuals"].items():
        lines.append(f"start residual, {T} steps: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    """`python -m fpmgm_hf.evaluation.depth MODEL`: the depth profile of a trained FP-MGM."""
    import argparse

    from .stability import add_model_arguments, fp_model_and_heldout, write_json

    p = argparse.ArgumentParser(description=main.__doc__)
    add_model_arguments(p)
    p.add_argument("--blocks", type=int, default=128, help="held-out blocks for the NELBO (the KL uses 32)")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 32, 96],
                   help="step counts of the start-residual generations (the sweep's picks at B24 / B96 / B384)")
    args = p.parse_args(argv)
    if args.blocks < 1:
        p.error(f"--blocks must be >= 1, got {args.blocks}")
    if any(T < 2 for T in args.steps):
        p.error(f"--steps must all be >= 2 (the first step has no warm start), got {args.steps}")
    model, val, seq_len = fp_model_and_heldout(p, args, "no depth to profile")
    profile = depth_profile(model, val, seq_len=seq_len, steps=args.steps, nelbo_blocks=args.blocks,
                            seed=args.seed)
    print(format_profile(profile))
    if args.json:
        write_json(args.json, profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
