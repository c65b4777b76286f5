"""Adapting a converted FP-MDLM to its MDLM teacher (arXiv 2605.31215, §3.4 and App. D.1.2).

The student (the FP-MDLM built by `fpmgm_hf.conversion.layer_mapping.map_layers`) sees a noisier canvas z_s at t_s; the
frozen teacher (the original MDLM) sees a cleaner, nested canvas z_c at t_c < t_s built from the same
per-token uniforms. The loss is

    L = NELBO_student(x0 | z_s) + lambda * tau^2 * mean_{i masked in z_s} KL(p_teacher^tau(i) || p_student^tau(i))

with SUBS distributions (the mask token is never predicted; a token visible in the teacher canvas is
carried over, i.e. the teacher is a one-hot on it), temperature tau = 1.5, lambda = 0.1 warmed up linearly.
`finetune` runs it through `fpmgm_hf.training.loop.Trainer` (the same Accelerate loop as training: checkpoints,
exact `--resume`, JSONL log, validation, early stop) with AdamW, lr 2e-4, gradient clipping 1.0; optionally
with the CoFRe hidden-state consistency term, as a following consistency stage, and with LoRA adapters.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..scheduling_fpmgm import loglinear_sigma
from ..training.lora import LORA_TARGETS, add_lora, parameter_summary
from ..training.objectives import consistency_weight_at, hidden_consistency, nested_masks, with_fixed_point_loss

Tensor = torch.Tensor
_NEG = -1e9  # a finite "minus infinity": keeps 0 * log 0 terms at exactly 0

__all__ = ["DistillLoss", "LORA_TARGETS", "add_lora", "distill_loss", "finetune", "kl_weight_at", "masked_nelbo",
           "nested_masks", "parameter_summary", "subs_log_probs", "tempered_subs_kl"]


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


# lambda of the KL term: the same linear warm-up as the consistency weight.
kl_weight_at = consistency_weight_at

def teacher_stream(teacher, z: Tensor, t: Tensor, eps: float, layer: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
    """The frozen teacher's logits on `z` and, with `layer` (1-based), its residual stream entering that layer
    `(B, L, D)` (the output of layer `layer - 1`), in eval mode without a graph."""
    captured = {}
    handle = None
    if layer is not None:
        blocks = list(teacher.model.pre_blocks) + list(teacher.model.post_blocks)
        def keep(module, args):
            captured["h"] = args[0]  # returns None: the layer's inputs are left as they are

        handle = blocks[layer - 1].register_forward_pre_hook(keep)
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            logits = teacher(z, timesteps=loglinear_sigma(t, eps), return_dict=True).logits
    finally:
        teacher.train(was_training)
        if handle is not None:
            handle.remove()
    return logits, captured.get("h")


def distill_loss(student, teacher, x0: Tensor, *, generator: torch.Generator, kl_weight: float = 0.1,
                 tau: float = 1.5, gap=(0.05, 0.30), eps: float = 1e-3,
                 consistency_weight: float = 0.0, return_consistency: bool = False,
                 hidden_weight: float = 0.0, hidden_layer: Optional[int] = None) -> tuple[Tensor, dict]:
    """`L = NELBO(student | z_s) + kl_weight * tau^2 * KL` averaged over student-masked positions.

    The NELBO is the token mean over all of `x0` of -log p_student(x0 | z_s) / t_s (zero on visible
    tokens). The student runs in its current mode (S-JFB when training); the teacher runs without a graph
    in eval mode. Only the student-masked rows of the (B, L, V) logits are turned into distributions,
    which keeps the vocabulary-sized float32 temporaries to the masked tokens.
    With `consistency_weight > 0` the CoFRe term `consistency_weight * objectives.hidden_consistency(h_s, h_c)`
    is added (averaged over student-masked positions), h_s the student's final hidden states on z_s and h_c
    the student's own (eval mode, no graph) on the teacher's cleaner canvas z_c.
    With `hidden_weight > 0` the student's fixed point (the post blocks' input) is pulled towards the teacher's
    residual stream entering `hidden_layer` (the teacher layer the first post block came from) on the teacher's
    canvas, by the same layer-normalised MSE over all positions: the shared block learns to stand in for the
    layers it replaced, not only to reproduce their logits.
    Returns `(loss, aux)` with the detached `nelbo`, `kl` (and `consistency`, also computed at weight 0 with
    `return_consistency`; `hidden` with `hidden_weight > 0`) and the two times.
    """
    mask_id = getattr(student, "module", student).config.mask_token_id
    z_s, z_c, t_s, t_c, student_mask, _ = nested_masks(x0, mask_id, generator=generator, gap=gap, eps=eps)
    s_out = student(z_s, timesteps=loglinear_sigma(t_s, eps), generator=generator, return_dict=True)
    s_logits = s_out.logits
    if hidden_weight > 0 and hidden_layer is None:
        raise ValueError("`hidden_weight` > 0 needs `hidden_layer`, the teacher layer of the first post block.")
    t_logits, t_hidden = teacher_stream(teacher, z_c, t_c, eps, hidden_layer if hidden_weight > 0 else None)
    rows = student_mask  # (B, L) bool
    s_rows, x_rows = s_logits[rows], x0[rows]  # (N, V), (N,)
    weight = (1.0 / t_s.float())[:, None].expand_as(rows)[rows]  # log-linear dsigma/expm1(sigma) = 1/t
    nll = -_tempered_log_probs(s_rows, mask_id).gather(-1, x_rows[:, None]).squeeze(-1)
    nelbo = (nll * weight).sum() / x0.numel()
    kl = tempered_subs_kl(t_logits[rows], s_rows, z_c[rows], x_rows, mask_id, tau)
    kl_mean = kl.sum() / max(int(rows.sum()), 1)
    loss = with_fixed_point_loss(nelbo + kl_weight * tau**2 * kl_mean, s_out)
    aux = {"nelbo": nelbo.detach(), "kl": kl_mean.detach(), "t_s": t_s, "t_c": t_c}
    if t_hidden is not None:
        hidden = hidden_consistency(s_out.fixed_point, t_hidden, torch.ones_like(rows))
        loss = loss + hidden_weight * hidden
        aux["hidden"] = hidden.detach()
    if consistency_weight > 0 or return_consistency:
        own = getattr(student, "module", student)
        was_training = own.training
        own.eval()
        try:
            with torch.no_grad():
                h_c = own(z_c, timesteps=loglinear_sigma(t_c, eps), return_dict=True).last_hidden_state.detach()
        finally:
            own.train(was_training)
        cons = hidden_consistency(s_out.last_hidden_state, h_c, rows)
        loss = loss + consistency_weight * cons
        aux["consistency"] = cons.detach()
    return loss, aux


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
            logits = model(z, timesteps=loglinear_sigma(t, eps), return_dict=True, **forward_kwargs).logits
            total += float((_nll_per_token(logits, z, x0, mask_id) / t[:, None]).mean())
    finally:
        model.train(was_training)
    return total / repeats


class DistillLoss:
    """`loss_fn` for `fpmgm_hf.training.loop.Trainer`: `distill_loss` with lambda warmed up over `kl_warmup` steps and,
    when `consistency_weight > 0`, the consistency term ramped over `consistency_warmup` steps."""

    def __init__(self, teacher, *, kl_weight: float = 0.1, kl_warmup: int = 5000, tau: float = 1.5, gap=(0.05, 0.30),
                 eps: float = 1e-3, consistency_weight: float = 0.0, consistency_warmup: int = 5000,
                 hidden_weight: float = 0.0, hidden_layer: Optional[int] = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.hidden_weight, self.hidden_layer = hidden_weight, hidden_layer
        self.kl_weight, self.kl_warmup, self.tau, self.gap, self.eps = kl_weight, kl_warmup, tau, tuple(gap), eps
        self.consistency_weight, self.consistency_warmup = consistency_weight, consistency_warmup

    def __call__(self, trainer, x0: Tensor):
        lam = kl_weight_at(trainer.step, self.kl_weight, self.kl_warmup)
        cons = consistency_weight_at(trainer.step, self.consistency_weight, self.consistency_warmup)
        if self.teacher.device != x0.device:
            self.teacher.to(x0.device)
        with trainer.acc.autocast():
            loss, aux = distill_loss(trainer.model, self.teacher, x0, generator=trainer.generator, kl_weight=lam,
                                     tau=self.tau, gap=self.gap, eps=self.eps, consistency_weight=cons,
                                     return_consistency=self.consistency_weight > 0, hidden_weight=self.hidden_weight,
                                     hidden_layer=self.hidden_layer)
        extra = {"nelbo": aux["nelbo"].item(), "kl": aux["kl"].item(), "kl_lambda": lam}
        if "hidden" in aux:
            extra["hidden"] = aux["hidden"].item()
        if "consistency" in aux:
            extra.update(consistency=aux["consistency"].item(), lambda_cons=cons)
        return loss, extra


# -------------------------------------------------------------------------------------------- fine-tune


def _stage_resume(resume: Optional[str], stage_dirs: list[str]) -> tuple[Optional[int], Optional[str]]:
    """(stage index, checkpoint) to continue from: `latest` is the newest checkpoint of the last stage that
    has one; a folder is used as given, for the stage whose directory contains it."""
    import os

    from ..training.loop import checkpoints, resolve_resume

    if resume is None:
        return None, None
    if resume == "latest":
        for i in reversed(range(len(stage_dirs))):
            found = checkpoints(os.path.join(stage_dirs[i], "checkpoints"))
            if found:
                return i, found[-1]
        return None, None
    path = os.path.abspath(resume)
    for i, d in enumerate(stage_dirs):
        if path.startswith(os.path.abspath(d) + os.sep):
            return i, resolve_resume(resume, d)
    raise ValueError(f"--resume {resume!r} is not a checkpoint under {stage_dirs}.")


def finetune(student, teacher, tokenizer, train_blocks: Tensor, val_blocks: Tensor, *, work_dir: str,
             steps: int, consistency_steps: int = 0, batch_size: int = 8, accelerator=None, lr: float = 2e-4,
             warmup_steps: int = 0, clip: float = 1.0, kl_weight: float = 0.1, kl_warmup: int = 5000,
             tau: float = 1.5, gap=(0.05, 0.30), eps: float = 1e-3, consistency_weight: float = 0.0,
             consistency_warmup: int = 5000, consistency_gap=(0.05, 0.30), stop_ppl_rise: Optional[float] = 0.15,
             eval_every: int = 500, eval_batches: int = 20, save_every: int = 1000, sample_steps: int = 8,
             seed: int = 0, resume: Optional[str] = None, lora_r: int = 0, lora_alpha: Optional[float] = None,
             merge: bool = True, log_every: int = 0, log: Optional[Callable[[str], None]] = print,
             hidden_weight: float = 0.0, hidden_layer: Optional[int] = None):
    """Adapt `student` to the frozen `teacher` with `fpmgm_hf.training.loop.Trainer`; returns `(student, summary)`.

    Stage "distill" (`steps` optimizer steps, skipped when 0): `DistillLoss` (NELBO + lambda tau^2 KL, plus the
    consistency term when `consistency_weight > 0` and `consistency_steps == 0`). Stage "consistency"
    (`consistency_steps > 0`): the CoFRe loss of `fpmgm_hf.training` (MDLM NELBO + lambda ||h_s - sg(h_c)||^2, the
    model as its own teacher), stopped early at the first evaluation whose validation PPL exceeds the
    pre-stage value by more than `stop_ppl_rise`. Each stage writes `work_dir/<stage>/log.jsonl` and
    resumable checkpoints `work_dir/<stage>/checkpoints/step_N`; `resume` ("latest" or a checkpoint folder)
    continues exactly. With `lora_r > 0` only LoRA adapters (and the injection) train; they are merged into
    the returned model unless `merge=False` (then the PEFT model is returned). The returned student is
    unwrapped and in eval mode. `hidden_weight` / `hidden_layer`: the hidden-state term of `distill_loss`.
    """
    import os
    from types import SimpleNamespace

    from accelerate import Accelerator

    from ..training.loop import Trainer, begin, run_loop

    if consistency_steps > 0 and consistency_weight <= 0:
        raise ValueError("--consistency-steps needs --consistency-weight > 0.")
    acc = accelerator or Accelerator()
    torch.manual_seed(seed + acc.process_index)  # dropout draws: the same run from the same seed (resume restores it)
    teacher.eval().requires_grad_(False).to(acc.device)
    model = add_lora(student, lora_r, lora_alpha) if lora_r else student
    summary = {"parameters": parameter_summary(model), "lora_r": lora_r,
               "lora_alpha": (2 * lora_r if lora_alpha is None else lora_alpha) if lora_r else None, "stages": {}}
    same_run = consistency_weight if consistency_steps == 0 else 0.0
    stages = []
    if steps > 0:
        stages.append(("distill", steps, same_run, DistillLoss(
            teacher, kl_weight=kl_weight, kl_warmup=kl_warmup, tau=tau, gap=gap, eps=eps,
            consistency_weight=same_run, consistency_warmup=consistency_warmup, hidden_weight=hidden_weight,
            hidden_layer=hidden_layer)))
    if consistency_steps > 0:
        stages.append(("consistency", consistency_steps, consistency_weight, None))
    dirs = [os.path.join(work_dir, name) for name, *_ in stages]
    first, checkpoint = _stage_resume(resume, dirs)
    if resume and checkpoint is None and log is not None and acc.is_main_process:
        log(f"--resume {resume}: no checkpoint under {work_dir} yet, starting from scratch")
    for i, (name, max_steps, cons_weight, loss_fn) in enumerate(stages):
        if first is not None and i < first:
            continue  # a later stage's checkpoint holds the weights
        args = SimpleNamespace(
            seq_len=train_blocks.shape[1], batch_size=batch_size, grad_accum=acc.gradient_accumulation_steps,
            max_steps=max_steps, lr=lr, warmup_steps=warmup_steps, weight_decay=0.0, clip=clip, ema=None, eps=eps,
            seed=seed, eval_every=eval_every, eval_batches=eval_batches, save_every=save_every, out=dirs[i],
            consistency_weight=cons_weight, consistency_warmup=consistency_warmup,
            consistency_gap=tuple(consistency_gap), stop_ppl_rise=stop_ppl_rise, sample_steps=sample_steps)
        if acc.is_main_process:
            os.makedirs(dirs[i], exist_ok=True)
        acc.wait_for_everyone()
        trainer = Trainer(args, acc, model, tokenizer, train_blocks, val_blocks, loss_fn=loss_fn)
        trainer.meta.update(stage=name, lora_r=lora_r)
        if log is not None and log_every:
            write = trainer.log

            def _log(record, _write=write, _name=name):
                _write(record)
                wanted = "event" in record or ("loss" in record and record["step"] % log_every == 0)
                if acc.is_main_process and wanted:  # evaluations at --eval-every are printed by run_loop
                    log(f"[{_name}] " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in record.items() if k != "time"))
            trainer.log = _log
        begin(trainer, checkpoint if i == first else None)
        run_loop(trainer)
        summary["stages"][name] = {"steps": trainer.step, "max_steps": max_steps, "stopped_early": trainer.stopped,
                                   "baseline_ppl": trainer.baseline_ppl, "log": os.path.join(dirs[i], "log.jsonl"),
                                   "consistency_weight": cons_weight}
        model = acc.unwrap_model(trainer.model)
        acc.wait_for_everyone()
        acc.free_memory()  # drops the prepared model/optimizer so the next stage checkpoints only its own
        del trainer
    if lora_r and merge:
        model = model.merge_and_unload()
    return model.eval(), summary
