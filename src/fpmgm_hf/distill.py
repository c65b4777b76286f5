"""Adapting a converted FP-MDLM to its MDLM teacher (arXiv 2605.31215, §3.4 and App. D.1.2).

The student (the FP-MDLM built by `fpmgm_hf.mdlm_import.map_layers`) sees a noisier canvas z_s at t_s; the
frozen teacher (the original MDLM) sees a cleaner, nested canvas z_c at t_c < t_s built from the same
per-token uniforms. The loss is

    L = NELBO_student(x0 | z_s) + lambda * tau^2 * mean_{i masked in z_s} KL(p_teacher^tau(i) || p_student^tau(i))

with SUBS distributions (the mask token is never predicted; a token visible in the teacher canvas is
carried over, i.e. the teacher is a one-hot on it), temperature tau = 1.5, lambda = 0.1 warmed up linearly.
`finetune` runs it with Accelerate (AdamW, lr 2e-4, gradient clipping 1.0).
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Iterable, Optional

import torch

Tensor = torch.Tensor
_NEG = -1e9  # a finite "minus infinity": keeps 0 * log 0 terms at exactly 0

__all__ = ["distill_loss", "finetune", "kl_weight_at", "masked_nelbo", "nested_masks", "subs_log_probs",
           "tempered_subs_kl"]


def _sigma(t: Tensor, eps: float) -> Tensor:
    """Log-linear schedule: sigma(t) = -log(1 - (1 - eps) t) (ignored by models without time conditioning)."""
    return -torch.log1p(-(1 - eps) * t)


def _local_nested_masks(x0: Tensor, mask_id: int, *, generator: torch.Generator, gap=(0.05, 0.30), eps: float = 1e-3):
    """Fallback for `fpmgm_hf.objectives.nested_masks`: one uniform u per token shared by both canvases;
    t_c = max(t_s - gap, eps); masked when u < (1 - eps) t. Rows whose masks coincide reveal one teacher
    token (the masked one with the largest u); rows with no student mask mask their smallest-u token."""
    B = x0.shape[0]
    u = torch.rand(x0.shape, generator=generator).to(x0.device)
    t_s = (eps + (1 - eps) * torch.rand((B,), generator=generator)).to(x0.device)
    delta = (gap[0] + (gap[1] - gap[0]) * torch.rand((B,), generator=generator)).to(x0.device)
    t_c = torch.clamp(t_s - delta, min=eps)
    student = u < ((1 - eps) * t_s)[:, None]
    teacher = u < ((1 - eps) * t_c)[:, None]
    empty = ~student.any(1)
    student[empty, u.argmin(1)[empty]] = True
    same = (student == teacher).all(1)
    last = u.masked_fill(~teacher, -math.inf).argmax(1)
    teacher[same, last[same]] = False
    masked = torch.full_like(x0, mask_id)
    return torch.where(student, masked, x0), torch.where(teacher, masked, x0), t_s, t_c, student, teacher


def nested_masks(x0: Tensor, mask_id: int, *, generator: torch.Generator, gap=(0.05, 0.30), eps: float = 1e-3):
    """Correlated (nested) masks: `(z_s, z_c, t_s, t_c, student_mask, teacher_mask)`, teacher ⊆ student.
    Uses `fpmgm_hf.objectives.nested_masks` when available, else a local implementation of the same rule."""
    try:
        from .objectives import nested_masks as shared
    except ImportError:
        shared = None
    if shared is None:
        return _local_nested_masks(x0, mask_id, generator=generator, gap=gap, eps=eps)
    return shared(x0, mask_id, generator=generator, gap=tuple(gap), eps=eps)


def _tempered_log_probs(logits: Tensor, mask_id: int, tau: float = 1.0) -> Tensor:
    """log softmax(logits / tau) in float32 with the mask token excluded (finite -inf)."""
    scaled = logits.float() / tau if tau != 1.0 else logits.float().clone()
    scaled[..., mask_id] = _NEG  # in place on a fresh tensor: division and the copy keep nothing for backward
    return torch.log_softmax(scaled, dim=-1)


def subs_log_probs(logits: Tensor, z: Tensor, x0: Tensor, mask_id: int, tau: float = 1.0) -> Tensor:
    """SUBS log-probabilities at temperature tau, `(..., V)` float32: the mask token gets (finite) -inf,
    visible positions of `z` are one-hot on their token (carry-over)."""
    logp = _tempered_log_probs(logits, mask_id, tau)
    visible = (z != mask_id)[..., None]
    one_hot = torch.full_like(logp, _NEG).scatter(-1, x0[..., None], 0.0)
    return torch.where(visible, one_hot, logp)


def tempered_subs_kl(teacher_logits: Tensor, student_logits: Tensor, z_c: Tensor, x0: Tensor, mask_id: int,
                     tau: float) -> Tensor:
    """KL(p_teacher^tau || p_student^tau) per position, shape `logits.shape[:-1]`.

    The teacher side is SUBS on its canvas `z_c` (a token visible to the teacher is a one-hot on it); the
    student side is the tempered distribution without the mask token (the KL is only used on positions
    masked in the student canvas). The teacher side carries no gradient.
    """
    log_s = _tempered_log_probs(student_logits, mask_id, tau)
    with torch.no_grad():
        log_t = subs_log_probs(teacher_logits.detach(), z_c, x0, mask_id, tau)
        p_t = log_t.exp()
        neg_entropy = (p_t * log_t).sum(-1)
    return neg_entropy - (p_t * log_s).sum(-1)


def kl_weight_at(step: int, target: float = 0.1, warmup: int = 5000) -> float:
    """lambda at `step`: linear warm-up from 0 to `target` over `warmup` steps, then constant."""
    return float(target) if warmup <= 0 else float(target) * min(1.0, max(step, 0) / warmup)


def distill_loss(student, teacher, x0: Tensor, *, generator: torch.Generator, kl_weight: float = 0.1,
                 tau: float = 1.5, gap=(0.05, 0.30), eps: float = 1e-3) -> tuple[Tensor, dict]:
    """`L = NELBO(student | z_s) + kl_weight * tau^2 * KL` averaged over student-masked positions.

    The NELBO is the token mean over all of `x0` of -log p_student(x0 | z_s) / t_s (zero on visible
    tokens). The student runs in its current mode (S-JFB when training); the teacher runs without a graph
    in eval mode. Only the student-masked rows of the (B, L, V) logits are turned into distributions,
    which keeps the vocabulary-sized float32 temporaries to the masked tokens.
    Returns `(loss, aux)` with the detached `nelbo`, `kl` and the two times.
    """
    mask_id = getattr(student, "module", student).config.mask_token_id
    z_s, z_c, t_s, t_c, student_mask, _ = nested_masks(x0, mask_id, generator=generator, gap=gap, eps=eps)
    s_logits = student(z_s, timesteps=_sigma(t_s, eps), generator=generator, return_dict=True).logits
    with torch.no_grad():
        was_training = teacher.training
        teacher.eval()
        t_logits = teacher(z_c, timesteps=_sigma(t_c, eps), return_dict=True).logits
        teacher.train(was_training)
    rows = student_mask  # (B, L) bool
    s_rows, x_rows = s_logits[rows], x0[rows]  # (N, V), (N,)
    weight = (1.0 / t_s.float())[:, None].expand_as(rows)[rows]  # log-linear dsigma/expm1(sigma) = 1/t
    nll = -_tempered_log_probs(s_rows, mask_id).gather(-1, x_rows[:, None]).squeeze(-1)
    nelbo = (nll * weight).sum() / x0.numel()
    kl = tempered_subs_kl(t_logits[rows], s_rows, z_c[rows], x_rows, mask_id, tau)
    kl_mean = kl.sum() / max(int(rows.sum()), 1)
    loss = nelbo + kl_weight * tau**2 * kl_mean
    return loss, {"nelbo": nelbo.detach(), "kl": kl_mean.detach(), "t_s": t_s, "t_c": t_c}


def _nll_per_token(logits: Tensor, z: Tensor, x0: Tensor, mask_id: int) -> Tensor:
    """-log p(x0 | z) under SUBS, zero on visible positions, `(B, L)`."""
    logp = _tempered_log_probs(logits, mask_id).gather(-1, x0[..., None]).squeeze(-1)
    return torch.where(z == mask_id, -logp, torch.zeros_like(logp))


@torch.no_grad()
def masked_nelbo(model, x0: Tensor, *, seed: int = 0, eps: float = 1e-3, repeats: int = 1, **forward_kwargs) -> float:
    """A simple validation NELBO (nats per token) of clean tokens `x0 (B, L)`: antithetic t over the batch,
    mask with probability (1 - eps) t, token mean of -log p(x0 | x_t) / t; averaged over `repeats` draws.
    The same `seed` gives the same t's and masks to every model, so teacher and student are comparable."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    mask_id = model.config.mask_token_id
    B = x0.shape[0]
    total = 0.0
    try:
        for _ in range(repeats):
            u0 = torch.rand((1,), generator=g)
            t = (eps + (1 - eps) * ((u0 + torch.arange(B) / B) % 1.0)).to(x0.device)
            masked = torch.rand(x0.shape, generator=g).to(x0.device) < ((1 - eps) * t)[:, None]
            z = torch.where(masked, torch.full_like(x0, mask_id), x0)
            logits = model(z, timesteps=_sigma(t, eps), return_dict=True, **forward_kwargs).logits
            total += float((_nll_per_token(logits, z, x0, mask_id) / t[:, None]).mean())
    finally:
        model.train(was_training)
    return total / repeats


def finetune(student, teacher, batches: Iterable[Tensor], *, steps: int, lr: float = 2e-4, clip: float = 1.0,
             kl_weight: float = 0.1, kl_warmup: int = 5000, tau: float = 1.5, gap=(0.05, 0.30), eps: float = 1e-3,
             seed: int = 0, accelerator=None, log_every: int = 50,
             log: Optional[Callable[[str], None]] = print):
    """Adapt `student` to the frozen `teacher` for `steps` optimizer steps with Accelerate; returns the
    unwrapped student (in eval mode).

    `batches` yields clean token blocks `(B, L)` (cycled if it runs out). AdamW (betas 0.9/0.999, no
    weight decay) at constant `lr`, gradient-norm clipping `clip`, lambda warmed up over `kl_warmup` steps.
    Gradient accumulation and mixed precision follow the `Accelerator` (e.g. from `accelerate launch`).
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    teacher.eval().requires_grad_(False)
    teacher.to(accelerator.device)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    student, optimizer = accelerator.prepare(student, optimizer)
    g = torch.Generator().manual_seed(seed + accelerator.process_index)
    stream = batches if hasattr(batches, "__next__") else itertools.cycle(batches)
    start, step, micro = time.time(), 0, 0
    while step < steps:
        try:
            x0 = next(stream).to(accelerator.device)
        except StopIteration:
            raise ValueError(f"the training data ran out after {step} of {steps} steps.") from None
        with accelerator.accumulate(student):
            weight = kl_weight_at(step, kl_weight, kl_warmup)
            with accelerator.autocast():
                loss, aux = distill_loss(student, teacher, x0, generator=g, kl_weight=weight, tau=tau, gap=gap,
                                         eps=eps)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip:
                accelerator.clip_grad_norm_(student.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
        micro += 1
        if accelerator.sync_gradients:
            step += 1
            if log is not None and accelerator.is_main_process and (step % log_every == 0 or step == steps):
                log(f"step {step}/{steps}  loss {float(loss.detach()):.4f}  nelbo {float(aux['nelbo']):.4f}  "
                    f"kl {float(aux['kl']):.4f}  lambda {weight:.4f}  {time.time() - start:.1f}s")
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(student).eval()
