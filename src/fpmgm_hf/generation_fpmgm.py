"""`model.generate(...)` for fixed-point masked generative models: compute budgets, three-state reuse
(3SR) warm starts, adaptive stopping, and the MDLM ancestral / MaskGIT confidence samplers.

Hub-portable: imports only torch, transformers, the standard library and sibling files. The model never
samples; this mixin owns the loop, `scheduling_fpmgm` owns the transitions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from .fixed_point_fpmgm import WarmStart
from .scheduling_fpmgm import (
    FP_SCHEDULES,
    ancestral_step,
    confidence_step,
    filter_log_probs,
    halton_order,
    loglinear_sigma,
    plan_budget,
    subs_log_probs,
    three_state_gamma,
)

Tensor = torch.Tensor
SAMPLERS = ("ancestral", "confidence")
REUSE_MODES = ("3sr", "full", "none")
ORDERS = ("confidence", "halton")
MASK_SCHEDULES = ("cosine", "linear", "arccos")

# name -> default; every field can be overridden per `generate` call.
_FIELDS: dict[str, Any] = {
    "batch_size": 1,
    "seq_len": None,
    "num_steps": None,
    "budget": None,
    "fp_iters_per_step": 4,
    "fp_schedule": "decreasing",
    "fp_tol": None,
    "sampler": "ancestral",
    "reuse": "3sr",
    "gamma_mask_min": 0.75,
    "gamma_mask_max": 0.90,
    "gamma_changed": 0.2,
    "temperature": 1.0,
    "top_k": None,
    "top_p": None,
    "noise_eps": 1e-3,
    "mask_schedule": "cosine",
    "randomness": 0.0,
    "order": "confidence",
    "guidance_scale": None,
    "use_cache": True,
    "return_dict_in_generate": False,
    "output_history": False,
    "output_solver_trace": False,
    "mask_token_id": None,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}
_META = ("_commit_hash", "_from_model_config", "transformers_version")


def _bad(name, value, allowed):
    raise ValueError(f"`{name}`={value!r} is invalid; allowed: {allowed}.")


class FPMGMGenerationConfig(GenerationConfig):
    r"""Generation settings of [`FPMGMGenerationMixin.generate`]; saved as `generation_config.json`.

    Args:
        batch_size / seq_len: size of an all-masked canvas when no `input_ids` are given.
        num_steps (`int`): denoising steps T (chosen from the budget when None).
        budget (`int`): total transformer-block passes per sample; each step costs K_pre + n_i K_fp + K_post.
        fp_iters_per_step (`int`, 4): iterations per step without a budget, and the target average when
            T is chosen automatically.
        fp_schedule (`str`, "decreasing"): allocation of iterations across steps, one of
            decreasing / fixed / increasing / cosine / front_loaded.
        fp_tol (`float`): adaptive stopping: per-sample relative-residual tolerance. Iterations it saves are
            reported (`block_passes` below the budget), not re-spent.
        sampler (`str`, "ancestral"): "ancestral" (MDLM reverse step) or "confidence" (MaskGIT).
        reuse (`str`, "3sr"): warm start of each step's solver: "3sr", "full" (previous z*) or "none" (h_pre).
        gamma_mask_min / gamma_mask_max / gamma_changed: the 3SR weights (0.75 / 0.90 / 0.2).
        temperature / top_k / top_p: token filtering (temperature 0 = greedy).
        noise_eps (`float`, 1e-3): epsilon of the log-linear schedule.
        mask_schedule (`str`, "cosine"), randomness (`float`, 0), order (`str`, "confidence"): MaskGIT
            schedule, annealed Gumbel noise on confidences, and reveal order ("halton" for images).
        guidance_scale (`float`): classifier-free guidance against the null class (class-conditional models).
        use_cache (`bool`, True): skip the network for rows whose canvas did not change since their last
            call (exact when time conditioning is off); skipped calls cost no budget.
        return_dict_in_generate / output_history: return an [`FPMGMGenerationOutput`], with canvases.
        output_solver_trace (`bool`, False): add each sample's residual per iteration to `step_stats`.
    """

    def __init__(self, **kwargs):
        # Deliberately no super().__init__(): GenerationConfig's autoregressive fields do not apply here.
        for name, default in _FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        for name in _META:
            setattr(self, name, kwargs.pop(name, None))
        if kwargs:
            raise ValueError(f"unknown generation options {sorted(kwargs)}; valid options: {sorted(_FIELDS)}.")
        self.validate()

    def validate(self, *args, **kwargs):  # noqa: C901 - a flat list of checks
        def pos_int(name, allow_none=True, low=1):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                _bad(name, v, f"an integer >= {low}" + (" or None" if allow_none else ""))

        for name in ("batch_size", "fp_iters_per_step"):
            pos_int(name, allow_none=False)
        for name in ("seq_len", "num_steps", "budget", "top_k"):
            pos_int(name)
        for name, allowed in (
            ("sampler", SAMPLERS),
            ("reuse", REUSE_MODES),
            ("fp_schedule", FP_SCHEDULES),
            ("order", ORDERS),
            ("mask_schedule", MASK_SCHEDULES),
        ):
            if getattr(self, name) not in allowed:
                _bad(name, getattr(self, name), list(allowed))
        for name in ("gamma_mask_min", "gamma_mask_max", "gamma_changed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                _bad(name, v, "a float in [0, 1]")
        if self.gamma_mask_min > self.gamma_mask_max:
            _bad("gamma_mask_min", self.gamma_mask_min, f"a value <= gamma_mask_max={self.gamma_mask_max}")
        checks = (
            ("temperature", 0, False),
            ("randomness", 0, False),
            ("fp_tol", 0, True),
            ("guidance_scale", 0, False),
            ("top_p", 0, True),
            ("noise_eps", 0, True),
        )
        for name, low, strict in checks:
            v = getattr(self, name)
            if v is None and name in ("fp_tol", "guidance_scale", "top_p"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > low if strict else v >= low):
                _bad(name, v, f"a number {'>' if strict else '>='} {low}")
        for name in ("use_cache", "return_dict_in_generate", "output_history", "output_solver_trace"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "True or False")
        if self.top_p is not None and self.top_p > 1:
            _bad("top_p", self.top_p, "a number in (0, 1]")
        if self.noise_eps >= 1:
            _bad("noise_eps", self.noise_eps, "a number in (0, 1)")

    def to_diff_dict(self) -> dict[str, Any]:
        # Compare against our own defaults, not GenerationConfig's (whose top_k=50 would be dropped).
        defaults = {**_FIELDS}
        out = {
            k: v for k, v in self.to_dict().items() if k == "transformers_version" or defaults.get(k, object()) != v
        }
        return out

    def get_generation_mode(self, *args, **kwargs):
        raise NotImplementedError("FPMGMGenerationConfig has no autoregressive generation mode.")

    @classmethod
    def from_model_config(cls, *args, **kwargs):
        # PreTrainedModel.__init__ falls back to `cls()` on NotImplementedError (pitfall P1).
        raise NotImplementedError("FPMGMGenerationConfig is not derived from the model config.")


@dataclass
class FPMGMGenerationOutput(ModelOutput):
    """Output of [`FPMGMGenerationMixin.generate`] with `return_dict_in_generate=True`.

    sequences (`LongTensor (B, L)`): the decoded canvases, with no mask token left.
    block_passes (`LongTensor (B,)`): transformer-block passes actually run per sample.
    num_steps (`int`): denoising steps T.
    nfe (`LongTensor (B,)`): denoiser calls per sample (steps skipped by the cache are not counted).
    budget (`int`): the requested budget (None when unbounded).
    step_stats (`list[dict]`): per step: `fp_iters` allotted, and per sample `iterations`, `residual`, `ran`,
        `diverged` / `cold_start` (the solver's safety net stopped the solve at its best iterate / rejected the
        warm start), and `trace`, the residual of every iteration, with `output_solver_trace=True`.
    history (`list[LongTensor (B, L)]`): the canvas after every step, when `output_history=True`.
    """

    sequences: Optional[Tensor] = None
    block_passes: Optional[Tensor] = None
    num_steps: Optional[int] = None
    nfe: Optional[Tensor] = None
    budget: Optional[int] = None
    step_stats: Optional[list] = None
    history: Optional[list] = None


class _WarmState:
    """Per-row solver state carried between denoising steps (explicit, never stored on the module)."""

    def __init__(self):
        self.fixed_point: Optional[Tensor] = None  # (B, L, D)
        self.canvas: Optional[Tensor] = None  # (B, L): canvas at each row's last network call
        self.logp: Optional[Tensor] = None  # (B, L, V): SUBS log-probs of that call


class FPMGMGenerationMixin:
    """Adds `generate` to [`FPMGMForMaskedGeneration`]. The name ends in `GenerationMixin` so that
    transformers' `can_generate()` recognises it without inheriting the autoregressive `GenerationMixin`."""

    generation_config_class = FPMGMGenerationConfig

    # ------------------------------------------------------------------------------------------ set-up

    def _prepare_generation_config(self, generation_config, kwargs) -> FPMGMGenerationConfig:
        base = generation_config if generation_config is not None else self.generation_config
        if not isinstance(base, FPMGMGenerationConfig):
            base = FPMGMGenerationConfig()
        cfg = copy.deepcopy(base)
        unknown = sorted(set(kwargs) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown generate() arguments {unknown}; valid options: {sorted(_FIELDS)}.")
        for key, value in kwargs.items():
            setattr(cfg, key, value)
        cfg.validate()
        if cfg.mask_token_id is None:
            cfg.mask_token_id = getattr(self.config, "mask_token_id", None)
        if cfg.mask_token_id is None:
            raise ValueError("`mask_token_id` is not set on the model config nor passed to generate().")
        return cfg

    def _prepare_canvas(self, input_ids, attention_mask, cfg):
        device = self.device
        if input_ids is None:
            length = cfg.seq_len or self.config.max_position_embeddings
            input_ids = torch.full((cfg.batch_size, length), cfg.mask_token_id, dtype=torch.long, device=device)
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"`input_ids` length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}."
            )
        active = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if active.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(active.shape)} must equal `input_ids` shape {tuple(input_ids.shape)}."
            )
        return input_ids.to(device).clone(), active.to(device)

    def _prepare_guidance(self, class_labels, cfg, batch):
        num_classes = getattr(self.config, "num_classes", 0)
        if cfg.guidance_scale is not None and not num_classes:
            raise ValueError(
                "`guidance_scale` needs a class-conditional model (config.num_classes > 0); this one is unconditional."
            )
        if class_labels is None:
            return None
        if not num_classes:
            raise ValueError("`class_labels` was given but the model is unconditional (config.num_classes=0).")
        labels = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
        if labels.numel() == 1 and batch > 1:
            labels = labels.expand(batch)
        if labels.shape[0] != batch or int(labels.min()) < 0 or int(labels.max()) > num_classes:
            raise ValueError(f"`class_labels` must be {batch} ids in [0, {num_classes}] ({num_classes} = null class).")
        return labels

    # ------------------------------------------------------------------------------------------ network

    def _denoise(self, canvas, active, labels, t, fp_iters, init, cfg):
        """One network call on a subset of rows; returns (logits, model output). Runs the conditional and
        the null-class branch together when guidance is on."""
        kwargs = dict(
            attention_mask=active.long(), fp_iters=fp_iters, fp_tol=cfg.fp_tol or 0, fp_trace=cfg.output_solver_trace
        )
        timesteps = loglinear_sigma(torch.full((canvas.shape[0],), t, device=canvas.device), cfg.noise_eps)
        guided = cfg.guidance_scale is not None and labels is not None
        if not guided:
            out = self(canvas, timesteps=timesteps, class_labels=labels, fixed_point_init=init, **kwargs)
            return out.logits, out
        null = torch.full_like(labels, self.config.num_classes)
        both = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
        kwargs["attention_mask"] = both(kwargs["attention_mask"])
        out = self(
            both(canvas),
            timesteps=both(timesteps),
            class_labels=torch.cat([labels, null]),
            fixed_point_init=init,
            **kwargs,
        )
        cond, uncond = out.logits.chunk(2)
        return uncond + cfg.guidance_scale * (cond - uncond), out

    def _warm_start(self, state: _WarmState, fp_rows, rows, canvas, active, cfg, guided):
        """The solver start of this call: None (h_pre), the previous z* (full) or a 3SR `WarmStart`."""
        if cfg.reuse == "none" or state.fixed_point is None or self.config.num_fp_layers == 0:
            return None
        prev = state.fixed_point[fp_rows]
        if cfg.reuse == "full":
            return prev
        gamma = three_state_gamma(
            state.canvas[rows],
            canvas,
            cfg.mask_token_id,
            active,
            cfg.gamma_mask_min,
            cfg.gamma_mask_max,
            cfg.gamma_changed,
        )  # (n, L)
        return WarmStart(prev, torch.cat([gamma, gamma]) if guided else gamma)

    # ----------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        class_labels: Optional[Tensor] = None,
        generation_config: Optional[FPMGMGenerationConfig] = None,
        generator: Optional[torch.Generator] = None,
        streamer: Optional[Any] = None,
        callback: Optional[Callable[[int, Tensor], None]] = None,
        **kwargs,
    ):
        r"""Fill every masked position of a canvas.

        Args:
            input_ids (`LongTensor (B, L)`): canvas; `mask_token_id` marks positions to fill (prompts and
                infilling). When None, an all-masked canvas of `batch_size` x `seq_len` is used.
            attention_mask (`(B, L)`): 0 marks padding, which is never attended to nor filled.
            class_labels (`LongTensor (B,)`): classes of a class-conditional model.
            generation_config ([`FPMGMGenerationConfig`]): defaults to `model.generation_config`.
            generator (`torch.Generator`): the only source of randomness.
            streamer: receives each intermediate canvas through `put_draft` (or `put`), then `end()`.
            callback: `callback(step, canvas)` after every step.
            kwargs: any [`FPMGMGenerationConfig`] field, overriding it for this call.

        Returns:
            `LongTensor (B, L)`, or an [`FPMGMGenerationOutput`] with `return_dict_in_generate=True`.
        """
        cfg = self._prepare_generation_config(generation_config, kwargs)
        canvas, active = self._prepare_canvas(input_ids, attention_mask, cfg)
        labels = self._prepare_guidance(class_labels, cfg, canvas.shape[0])
        c = self.config
        plan = plan_budget(
            cfg.budget,
            cfg.num_steps,
            c.num_pre_layers,
            c.num_fp_layers,
            c.num_post_layers,
            cfg.fp_schedule,
            cfg.fp_iters_per_step,
        )
        was_training = self.training
        self.eval()  # training mode would run S-JFB draws instead of the planned iterations
        try:
            out = self._sample_loop(canvas, active, labels, plan, cfg, generator, streamer, callback)
        finally:
            self.train(was_training)
        return out if cfg.return_dict_in_generate else out.sequences

    def _sample_loop(self, canvas, active, labels, plan, cfg, generator, streamer, callback):
        B, T, mask_id = canvas.shape[0], len(plan), cfg.mask_token_id
        guided = cfg.guidance_scale is not None and labels is not None
        state = _WarmState()
        passes = torch.zeros(B, dtype=torch.long, device=canvas.device)
        nfe = torch.zeros_like(passes)
        initial_masked = ((canvas == mask_id) & active).sum(1)
        order = self._reveal_order(cfg, canvas.shape[1])
        history, step_stats = [], []
        for i, fp_iters in enumerate(plan):
            t, s = 1 - i / T, 1 - (i + 1) / T
            rows = self._rows_to_run(state, canvas, active, mask_id, cfg)
            stats = {
                "fp_iters": fp_iters,
                "iterations": torch.zeros_like(passes),
                "residual": torch.full((B,), float("nan")),
                "ran": torch.zeros(B, dtype=torch.bool),
                "diverged": torch.zeros(B, dtype=torch.bool),
                "cold_start": torch.zeros(B, dtype=torch.bool),
            }
            if rows.numel():
                self._run_rows(state, rows, canvas, active, labels, t, fp_iters, cfg, guided, passes, stats)
                nfe[rows] += 1
            logp = filter_log_probs(state.logp, cfg.temperature, cfg.top_k, cfg.top_p)
            if cfg.sampler == "ancestral":
                canvas = ancestral_step(canvas, logp, t, s, mask_id, active, generator, cfg.noise_eps)
            else:
                canvas = confidence_step(
                    canvas,
                    logp,
                    i,
                    T,
                    initial_masked,
                    mask_id,
                    active,
                    generator,
                    cfg.randomness,
                    cfg.mask_schedule,
                    order,
                )
            step_stats.append(stats)
            self._emit(canvas, i, history, cfg, streamer, callback)
        if streamer is not None:
            streamer.end()
        return FPMGMGenerationOutput(
            sequences=canvas,
            block_passes=passes,
            num_steps=T,
            nfe=nfe,
            budget=cfg.budget,
            step_stats=step_stats,
            history=history if cfg.output_history else None,
        )

    def _reveal_order(self, cfg, length):
        if cfg.sampler != "confidence" or cfg.order != "halton":
            return None
        grid = getattr(self.config, "grid_size", None)
        rows, cols = grid if grid is not None else (1, length)
        if rows * cols != length:
            raise ValueError(
                f"`order`='halton' needs a canvas of grid_size {rows}x{cols}={rows * cols} tokens, got {length}."
            )
        return halton_order(rows, cols).to(self.device)

    def _rows_to_run(self, state, canvas, active, mask_id, cfg):
        """Rows that need a network call: any masked token left, and (with the cache) a changed canvas."""
        pending = ((canvas == mask_id) & active).any(1)
        if state.canvas is not None and cfg.use_cache and not self.config.time_conditioning:
            pending &= (canvas != state.canvas).any(1)
        elif state.canvas is None:
            state.canvas = canvas.clone()
        return pending.nonzero().squeeze(1)

    def _run_rows(self, state, rows, canvas, active, labels, t, fp_iters, cfg, guided, passes, stats):
        B, n = canvas.shape[0], rows.numel()
        fp_rows = torch.cat([rows, rows + B]) if guided else rows  # guided state holds [cond; null] rows
        sub_canvas, sub_active = canvas[rows], active[rows]
        init = self._warm_start(state, fp_rows, rows, sub_canvas, sub_active, cfg, guided)
        sub_labels = None if labels is None else labels[rows]
        logits, out = self._denoise(sub_canvas, sub_active, sub_labels, t, fp_iters, init, cfg)
        logp = subs_log_probs(logits, sub_canvas, cfg.mask_token_id)  # float64 from here on
        if state.logp is None:
            state.logp = logp.new_zeros(canvas.shape + logp.shape[-1:])
            state.fixed_point = out.fixed_point.new_zeros(((2 if guided else 1) * B,) + out.fixed_point.shape[1:])
        state.logp[rows] = logp
        state.canvas[rows] = sub_canvas
        state.fixed_point[fp_rows] = out.fixed_point
        passes[rows] += out.block_passes[:n]
        stats["iterations"][rows] = out.solver_stats.iterations[:n]
        stats["residual"][rows.cpu()] = out.solver_stats.residual[:n].float().cpu()
        stats["ran"][rows.cpu()] = True
        for flag in ("diverged", "cold_start"):  # the solver's safety net (FPMGMConfig.fp_divergence_patience)
            value = getattr(out.solver_stats, flag, None)
            if value is not None:
                stats[flag][rows.cpu()] = value[:n].cpu()
        if out.solver_stats.trace is not None:
            trace = torch.full((B, out.solver_stats.trace.shape[1]), float("nan"))
            trace[rows.cpu()] = out.solver_stats.trace[:n].float().cpu()
            stats["trace"] = trace

    def _emit(self, canvas, step, history, cfg, streamer, callback):
        if cfg.output_history:
            history.append(canvas.clone())
        if callback is not None:
            callback(step, canvas)
        if streamer is not None:
            (getattr(streamer, "put_draft", None) or streamer.put)(canvas.clone())

    # ------------------------------------------------------------------------------------------ loading

    def adjust_generation_fn(
        self,
        generation_config,
        from_auto_class,
        from_pipeline,
        pretrained_model_name_or_path,
        cache_dir,
        force_download,
        proxies,
        local_files_only,
        token,
        revision,
        subfolder,
        trust_remote_code,
        **kwargs,
    ):
        """Load `generation_config.json` into [`FPMGMGenerationConfig`] (transformers' default would build a
        plain `GenerationConfig` and drop our fields: pitfall P2)."""
        if generation_config is not None:
            self.generation_config = FPMGMGenerationConfig.from_dict(generation_config.to_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        try:
            self.generation_config = FPMGMGenerationConfig.from_pretrained(
                pretrained_model_name_or_path,
                cache_dir=cache_dir,
                force_download=force_download,
                proxies=proxies,
                local_files_only=local_files_only,
                token=token,
                revision=revision,
                subfolder=subfolder,
                _from_auto=from_auto_class,
                _from_pipeline=from_pipeline,
            )
        except OSError:
            pass  # no generation_config.json: keep the defaults
