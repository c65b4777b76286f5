"""Training objectives of masked generative models: MDLM's continuous-time NELBO, the MaskGIT masked
cross-entropy, and CoFRe's cross-step consistency loss on nested masks (arXiv 2605.31215, §3.2).

Every random draw takes an explicit CPU `torch.Generator` (draws are made on the generator's device and
then moved to the data's device), so a run is reproducible from the generator's state alone; the global
RNG is never touched here. The model's S-JFB iteration counts are drawn from the same generator.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..scheduling_fpmgm import loglinear_mask_prob, loglinear_sigma

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


def mdlm_nelbo(model, x0: Tensor, *, generator: torch.Generator, eps: float = 1e-3,
               attention_mask: Optional[Tensor] = None, antithetic: bool = True,
               model_kwargs: Optional[dict] = None) -> tuple[Tensor, dict]:
    """MDLM's continuous-time NELBO (SUBS, log-linear schedule) of clean tokens `x0` (B, L).

    t ~ U[eps, 1] (antithetic by default), each active token is masked with probability (1 - eps) t, and
    loss = token mean over `attention_mask` of -log p(x0 | x_t) / t. The model sees sigma(t) as timestep.

    Returns `(loss, aux)`; aux holds `output` (the model output), `t` (B,), `z` (x_t), `masked` (B, L),
    `nll_sum` and `num_tokens` (for perplexity over many batches).
    """
    mask_id = _unwrap(model).config.mask_token_id
    _check_tokens(x0, mask_id, attention_mask)
    active = _active(x0, attention_mask)
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


# ----------------------------------------------------------------------------------------- MaskGIT loss


def maskgit_masks(x0: Tensor, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """MaskGIT masks: ratio r = cos(pi/2 u), u ~ U(0, 1]; ceil(r L) positions (at least 1) chosen at random.

    Returns (masked (B, L) bool, r (B,))."""
    B, L = x0.shape
    u = 1.0 - _rand((B,), generator, x0.device)  # (0, 1]
    r = torch.cos(math.pi / 2 * u)
    n_mask = torch.ceil(r * L).long().clamp(1, L)  # (B,)
    scores = _rand((B, L), generator, x0.device)
    ranks = scores.argsort(dim=-1).argsort(dim=-1)  # rank of every position
    return ranks < n_mask[:, None], r


def maskgit_loss(model, x0: Tensor, *, generator: torch.Generator, class_labels: Optional[Tensor] = None,
                 label_dropout: float = 0.1, num_classes: int = 0) -> tuple[Tensor, dict]:
    """MaskGIT training loss: cross-entropy of `x0` at the masked positions (mask logit excluded).

    With `class_labels`, each label is replaced by the null class id (`num_classes`, default
    `model.config.num_classes`) with probability `label_dropout` (classifier-free guidance training).
    The model sees sigma(r) of the mask ratio r as timestep. Returns `(loss, aux)`.
    """
    config = _unwrap(model).config
    mask_id = config.mask_token_id
    _check_tokens(x0, mask_id, None)
    masked, r = maskgit_masks(x0, generator=generator)
    labels = class_labels
    if class_labels is not None:
        null = num_classes or config.num_classes
        drop = _rand(class_labels.shape, generator, class_labels.device) < label_dropout
        labels = torch.where(drop, torch.full_like(class_labels, null), class_labels)
    z = torch.where(masked, torch.full_like(x0, mask_id), x0)
    out = model(z, timesteps=loglinear_sigma(r), class_labels=labels, generator=generator)
    logits = out.logits.float().clone()
    logits[..., mask_id] = -math.inf
    loss = with_fixed_point_loss(F.cross_entropy(logits[masked], x0[masked]), out)
    return loss, {"output": out, "ratio": r, "z": z, "masked": masked, "class_labels": labels}


# ------------------------------------------------------------------------------------------- consistency


def nested_masks(x0: Tensor, mask_id: int, *, generator: torch.Generator, gap: tuple[float, float] = (0.05, 0.30),
                 eps: float = 1e-3, attention_mask: Optional[Tensor] = None):
    """Correlated student / teacher masks (paper App. C.3.3).

    One u per token is reused for both branches: t_s ~ U[eps, 1], delta ~ U[gap], t_c = max(t_s - delta, eps),
    and a token is masked when u < (1 - eps) t. So teacher ⊆ student. Every row gets at least one
    student-masked token (the active position with the smallest u), and where the two masks coincide the
    teacher reveals its masked position with the largest u, so the teacher is strictly cleaner.

    Returns `(z_s, z_c, t_s, t_c, student_mask, teacher_mask)`.
    """
    _check_tokens(x0, mask_id, attention_mask)
    B, device = x0.shape[0], x0.device
    active = _active(x0, attention_mask)
    u = _rand(x0.shape, generator, device)
    t_s = eps + (1 - eps) * _rand((B,), generator, device)
    delta = gap[0] + (gap[1] - gap[0]) * _rand((B,), generator, device)
    t_c = torch.clamp(t_s - delta, min=eps)
    student = (u < loglinear_mask_prob(t_s, eps)[:, None]) & active
    teacher = (u < loglinear_mask_prob(t_c, eps)[:, None]) & active

    empty = ~student.any(1) & active.any(1)
    first = u.masked_fill(~active, math.inf).argmin(1)  # (B,)
    student[empty, first[empty]] = True

    same = (student == teacher).all(1) & student.any(1)
    last = u.masked_fill(~teacher, -math.inf).argmax(1)
    teacher[same, last[same]] = False

    masked_ids = torch.full_like(x0, mask_id)
    return torch.where(student, masked_ids, x0), torch.where(teacher, masked_ids, x0), t_s, t_c, student, teacher


def _teacher_forward(teacher, z_c, t_c, eps, attention_mask, model_kwargs):
    """The teacher's final hidden states without a graph, in eval mode (no dropout, the config's
    deterministic fixed-point solve); the module's training flag is restored afterwards."""
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            out = teacher(z_c, timesteps=loglinear_sigma(t_c, eps), attention_mask=attention_mask, **model_kwargs)
    finally:
        teacher.train(was_training)
    return out.hidden_states.detach()


def consistency_loss(model, x0: Tensor, *, generator: torch.Generator, weight: float, eps: float = 1e-3,
                     gap: tuple[float, float] = (0.05, 0.30), attention_mask: Optional[Tensor] = None,
                     teacher=None, model_kwargs: Optional[dict] = None) -> tuple[Tensor, dict]:
    """CoFRe training loss `L = L_MDLM(student) + weight * L_CONS` on nested masks.

    L_MDLM is the NELBO of `x0` given the noisier student canvas z_s at t_s (weight 1 / t_s). L_CONS is
    [`hidden_consistency`] between the final pre-logit hidden states h_s and sg(h_c). The teacher is `model`
    itself (or `teacher`, e.g. an EMA copy), run on the cleaner canvas z_c at t_c under `torch.no_grad` in eval
    mode.

    Returns `(loss, aux)` with `task`, `consistency` (detached), `output` (student), masks and times.
    """
    model_kwargs = model_kwargs or {}
    config = _unwrap(model).config
    z_s, z_c, t_s, t_c, student, teacher_mask = nested_masks(
        x0, config.mask_token_id, generator=generator, gap=gap, eps=eps, attention_mask=attention_mask
    )
    out = model(z_s, timesteps=loglinear_sigma(t_s, eps), attention_mask=attention_mask, generator=generator,
                **model_kwargs)
    nll = subs_token_nll(out.logits, z_s, x0, config.mask_token_id)
    task, total, count = weighted_token_mean(nll, t_s, _active(x0, attention_mask))
    h_c = _teacher_forward(_unwrap(teacher if teacher is not None else model), z_c, t_c, eps, attention_mask,
                           model_kwargs)
    cons = hidden_consistency(out.hidden_states, h_c, student)
    loss = with_fixed_point_loss(task + weight * cons, out)
    aux = {"output": out, "task": task.detach(), "consistency": cons.detach(), "t_s": t_s, "t_c": t_c,
           "student_mask": student, "teacher_mask": teacher_mask, "nll_sum": total.detach(), "num_tokens": count}
    return loss, aux


def hidden_consistency(h_s: Tensor, h_c: Tensor, positions: Tensor) -> Tensor:
    """L_CONS = mean over `positions` (B, L) of ||LN(h_s) - LN(h_c)||^2 / D, with LN a LayerNorm without
    affine weights, in float32; `h_c` should already carry no gradient.

    The paper writes ||h_s - sg(h_c)||^2 and leaves reduction and normalisation open. Normalising first makes
    the term independent of the residual stream's scale: on the raw states, a shared block that grows its
    outputs inflates the term without bound (seen here: 1.7 -> 1e6 within 17 conversion steps at lr 1e-3),
    and the mean over D keeps lambda = 0.1 meaningful at any width. The value lies in [0, 4].
    """
    D = h_s.shape[-1]
    a = F.layer_norm(h_s.float(), (D,))
    b = F.layer_norm(h_c.detach().float(), (D,))
    sq = (a - b).pow(2).mean(-1)  # (B, L)
    w = positions.float()
    return (sq * w).sum() / w.sum().clamp_min(1.0)


def consistency_weight_at(step: int, target: float = 0.1, warmup: int = 5000) -> float:
    """Consistency weight lambda at `step` of the stage: linear ramp from 0 to `target` over `warmup` steps."""
    if warmup <= 0:
        return float(target)
    return float(target) * min(1.0, max(step, 0) / warmup)
