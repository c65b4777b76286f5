"""MDLM's continuous-time NELBO (SUBS, log-linear schedule), the loss `FPMGMForMaskedGeneration(labels=...)`
returns and `fpmgm-train` minimises (arXiv 2406.07524; the paper trains FP-MDLM on it unchanged).

Every random draw takes an explicit `torch.Generator` (None: torch's default generator), made on the generator's
device and moved to the data's device. Hub-portable: imports only torch, the standard library and sibling files.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .scheduling_fpmgm import loglinear_mask_prob, loglinear_sigma

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------ draws


def _rand(shape, generator: torch.Generator, device) -> Tensor:
    """U[0, 1) float32 draws from `generator`, placed on `device`."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def sample_times(batch: int, *, generator: torch.Generator, eps: float = 1e-3, antithetic: bool = True,
                 device=None) -> Tensor:
    """t ~ U[eps, 1] per row, shape (B,). Antithetic: one u, `t_i = eps + (1 - eps) ((u + i / B) mod 1)`."""
    if antithetic:
        u = _rand((1,), generator, device)
        offsets = torch.arange(batch, device=device, dtype=u.dtype) / batch
        u = (u + offsets) % 1.0
    else:
        u = _rand((batch,), generator, device)
    return eps + (1 - eps) * u


def _active(x0: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    return torch.ones_like(x0, dtype=torch.bool) if attention_mask is None else attention_mask.bool()


def _check_tokens(x0: Tensor, mask_id: int, attention_mask: Optional[Tensor]) -> None:
    if x0.dim() != 2:
        raise ValueError(f"`x0` must have shape (batch, length), got {tuple(x0.shape)}.")
    if attention_mask is not None and attention_mask.shape != x0.shape:
        raise ValueError(
            f"`attention_mask` shape {tuple(attention_mask.shape)} must equal `x0` shape {tuple(x0.shape)}."
        )
    if bool(((x0 == mask_id) & _active(x0, attention_mask)).any()):
        raise ValueError(f"`x0` contains the mask token id {mask_id}: clean data must not be masked.")


# ------------------------------------------------------------------------------------------- MDLM loss


def subs_token_nll(logits: Tensor, z: Tensor, x0: Tensor, mask_id: int) -> Tensor:
    """-log p(x0 | z) per token under SUBS, shape (B, L), float32.

    The mask logit is excluded before the log-softmax; visible tokens carry over (log p = 0), so only
    masked positions contribute, and only their (N, V) logits are materialised in float32.
    """
    masked = z == mask_id
    rows = logits[masked].float()  # (N, V), a copy: safe to edit in place
    rows[:, mask_id] = -math.inf
    nll = torch.zeros(z.shape, dtype=torch.float32, device=logits.device)
    return nll.masked_scatter(masked, F.cross_entropy(rows, x0[masked], reduction="none"))


def weighted_token_mean(nll: Tensor, t: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Token mean of `nll * (1 / t)` over `active`: the log-linear weight dsigma / expm1(sigma) is 1 / t.

    Returns (mean, weighted sum, token count)."""
    weighted = nll * (1.0 / t.float())[:, None] * active.float()
    total, count = weighted.sum(), active.float().sum()
    return total / count.clamp_min(1.0), total, count


def mdlm_nelbo(model, x0: Tensor, *, generator: Optional[torch.Generator], eps: float = 1e-3,
               attention_mask: Optional[Tensor] = None, antithetic: bool = True,
               model_kwargs: Optional[dict] = None, loss_mask: Optional[Tensor] = None) -> tuple[Tensor, dict]:
    """MDLM's continuous-time NELBO (SUBS, log-linear schedule) of clean tokens `x0` (B, L).

    t ~ U[eps, 1] (antithetic by default), each scored token is masked with probability (1 - eps) t, and
    loss = token mean over the scored tokens of -log p(x0 | x_t) / t. The model sees sigma(t) as timestep.
    Scored: where `attention_mask` (default all) and `loss_mask` (default all) are set; the others stay visible as
    context (e.g. a prompt) and are not scored.

    Returns `(loss, aux)`; aux holds `output` (the model output), `t` (B,), `z` (x_t), `masked` (B, L),
    `nll_sum` and `num_tokens` (for perplexity over many batches).
    """
    mask_id = _unwrap(model).config.mask_token_id
    _check_tokens(x0, mask_id, attention_mask)
    active = _active(x0, attention_mask)
    if loss_mask is not None:
        active = active & loss_mask.bool()
    t = sample_times(x0.shape[0], generator=generator, eps=eps, antithetic=antithetic, device=x0.device)
    masked = (_rand(x0.shape, generator, x0.device) < loglinear_mask_prob(t, eps)[:, None]) & active
    z = torch.where(masked, torch.full_like(x0, mask_id), x0)
    out = model(z, timesteps=loglinear_sigma(t, eps), attention_mask=attention_mask, generator=generator,
                **(model_kwargs or {}))
    nll = subs_token_nll(out.logits, z, x0, mask_id)
    loss, total, count = weighted_token_mean(nll, t, active)
    aux = {"output": out, "t": t, "z": z, "masked": masked, "nll_sum": total.detach(), "num_tokens": count}
    return with_fixed_point_loss(loss, out), aux


def _unwrap(model):
    return getattr(model, "module", model)


def with_fixed_point_loss(loss: Tensor, output) -> Tensor:
    """Add the model's fixed-point regulariser (`output.fixed_point_loss`, training mode with
    `fp_jacobian_reg` / `fp_residual_reg` > 0) to a task loss; unchanged when there is none."""
    penalty = getattr(output, "fixed_point_loss", None)
    return loss if penalty is None else loss + penalty.to(loss.dtype)
