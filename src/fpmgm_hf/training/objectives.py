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

from ..loss_fpmgm import (  # noqa: F401  (the NELBO lives with the model, Hub-portable; its names stay here too)
    _active,
    _check_tokens,
    _rand,
    _unwrap,
    mdlm_nelbo,
    sample_times,
    subs_token_nll,
    weighted_token_mean,
    with_fixed_point_loss,
)
from ..scheduling_fpmgm import loglinear_mask_prob, loglinear_sigma

Tensor = torch.Tensor


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
    return out.last_hidden_state.detach()


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
    cons = hidden_consistency(out.last_hidden_state, h_c, student)
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
