"""`model.generate(...)` for fixed-point masked generative models: prompts and new tokens, blockwise decoding
with a sliding context, compute budgets, three-state reuse (3SR) warm starts, adaptive stopping, the MDLM
ancestral / MaskGIT confidence samplers, the EOS rule and streamers (docs/generation.md).

Hub-portable: imports only torch, transformers, the standard library and sibling files. The model never
samples: this mixin owns the loops, `scheduling_fpmgm` the transitions, `canvas_fpmgm` the canvas layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from transformers.utils import ModelOutput

from .canvas_fpmgm import (
    apply_eos,
    eos_reached,
    first_masked_column,
    pack,
    plan_blocks,
)
from .fixed_point_fpmgm import WarmStart
from .generation_config_fpmgm import (
    MASK_SCHEDULES,
    ORDERS,
    REUSE_MODES,
    SAMPLERS,
    FPMGMGenerationConfig,
    merge_generation_config,
)
from .generation_inputs_fpmgm import GenerationInputsMixin
from .scheduling_fpmgm import (
    ancestral_reveal,
    confidence_select,
    draw_rows,
    halton_order,
    loglinear_sigma,
    plan_budget,
    three_state_gamma,
)
from .streaming_fpmgm import StreamEmitter

Tensor = torch.Tensor
__all__ = [
    "FPMGMGenerationConfig",
    "FPMGMGenerationMixin",
    "FPMGMGenerationOutput",
    "MASK_SCHEDULES",
    "ORDERS",
    "REUSE_MODES",
    "SAMPLERS",
]


@dataclass
class FPMGMGenerationOutput(ModelOutput):
    """Output of [`FPMGMGenerationMixin.generate`] with `return_dict_in_generate=True`.

    sequences (`LongTensor (B, L)`): the decoded canvases, with no mask token left.
    block_passes (`LongTensor (B,)`): transformer-block passes actually run per sample (all blocks).
    num_steps (`int`): denoising steps T per block.
    nfe (`LongTensor (B,)`): denoiser calls per sample (steps skipped by the cache are not counted).
    budget (`int`): the requested budget per block (None when unbounded).
    step_stats (`list[dict]`): per step: `fp_iters` allotted, `block` (its index), and per sample `iterations`,
        `residual`, `ran`, `diverged` / `cold_start` (the solver's safety net stopped the solve at its best
        iterate / rejected the warm start), and `trace`, the residual of every iteration, with
        `output_solver_trace=True`.
    history (`list[LongTensor (B, L)]`): the canvas after every step, when `output_history=True`.
    attention_mask (`BoolTensor (B, L)`): False on padding of `sequences`.
    num_blocks (`int`): blocks decoded (1 without `block_length` when the sequence fits the model).
    """

    sequences: Optional[Tensor] = None
    block_passes: Optional[Tensor] = None
    num_steps: Optional[int] = None
    nfe: Optional[Tensor] = None
    budget: Optional[int] = None
    step_stats: Optional[list] = None
    history: Optional[list] = None
    attention_mask: Optional[Tensor] = None
    num_blocks: Optional[int] = None


class _WarmState:
    """Per-row state carried between denoising steps of one block (explicit, never on the module). Rows are the
    batch, or `[conditional; null-class]` (2B) under classifier-free guidance."""

    def __init__(self, batch: int, device=None):
        self.fixed_point: Optional[Tensor] = None  # (B | 2B, L, D): z* of each row's last network call
        self.hidden: Optional[Tensor] = None  # (B | 2B, L, D): post-block output of that call (the head's input)
        self.cond: Optional[Tensor] = None  # (B | 2B, cond_dim): its conditioning vector
        self.canvas: Optional[Tensor] = None  # (B, L): the canvas it saw
        self.ran = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,): run yet in this block?


@dataclass
class _Hooks:
    """What a caller plugs into every step: a transformers `LogitsProcessorList` run on the logits of the drawn
    positions, and Dream's `generation_logits_hook_func(step, x, logits) -> logits` /
    `generation_tokens_hook_func(step, x, logits) -> x`, which see the full `(B, L, V)` logits (so with either hook
    the head runs at every position)."""

    processors: Any = None
    tokens: Optional[Callable] = None
    logits: Optional[Callable] = None

    @property
    def full_logits(self) -> bool:
        return self.tokens is not None or self.logits is not None


@dataclass
class _Window:
    """One block being decoded: the columns `[ws, we)` the network sees and where it may reveal tokens."""

    active: Tensor  # (B, W) False on padding: the attention mask
    fill: Tensor  # (B, W) True inside the block (and not padding): where tokens may be revealed
    block: tuple[int, int]  # the block's columns [s, e) relative to the window
    index: int


def _progress(enabled: bool, total: int):
    """A tqdm bar over the denoising steps of all blocks, or None (tqdm is optional: no bar without it)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="step")


class FPMGMGenerationMixin(GenerationInputsMixin):
    """Adds `generate` / `diffusion_generate` to [`FPMGMForMaskedGeneration`]. The name ends in
    `GenerationMixin` so that transformers' `can_generate()` recognises it without inheriting the
    autoregressive `GenerationMixin`."""

    generation_config_class = FPMGMGenerationConfig

    @property
    def generation_config(self) -> Optional[FPMGMGenerationConfig]:
        """The model's default generation settings (`generation_config.json`), used by `generate`, as in
        transformers. Assigning a transformers `GenerationConfig` (or a dict) translates the fields it sets; a field
        this model cannot use (`num_beams`, `repetition_penalty`, ...) is refused at once, naming it."""
        return self.__dict__.get("_fpmgm_generation_config")

    @generation_config.setter
    def generation_config(self, value) -> None:
        if value is not None and not isinstance(value, FPMGMGenerationConfig):
            value = merge_generation_config(FPMGMGenerationConfig(), value, {})
        self.__dict__["_fpmgm_generation_config"] = value

    # ------------------------------------------------------------------------------------------ set-up

    # ------------------------------------------------------------------------------------------ network

    def _denoise(self, canvas, active, labels, t, fp_iters, init, cfg):
        """One call of the denoiser body (no output head) on a subset of rows; the conditional and the null-class
        branch run together as `[cond; null]` rows when guidance is on. Returns the base model's output."""
        # No mask when nothing is padded: SDPA takes its unmasked kernel and the solver's residual skips masking.
        mask = None if bool(active.all()) else active.long()  # (B, L)
        kwargs = dict(attention_mask=mask, fp_iters=fp_iters, fp_tol=cfg.fp_tol or 0, fp_trace=cfg.output_solver_trace)
        timesteps = loglinear_sigma(torch.full((canvas.shape[0],), t, device=canvas.device), cfg.noise_eps)
        if not (cfg.guidance_scale is not None and labels is not None):
            return self.model(canvas, timesteps=timesteps, class_labels=labels, fixed_point_init=init, **kwargs)
        null = torch.full_like(labels, self.config.num_classes)
        both = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
        kwargs["attention_mask"] = both(kwargs["attention_mask"])
        return self.model(both(canvas), timesteps=both(timesteps), class_labels=torch.cat([labels, null]),
                          fixed_point_init=init, **kwargs)

    def _logits_at(self, state: _WarmState, rows: Tensor, cols: Tensor, guided: bool, cfg):
        """`logits_fn(start, end)` for `draw_rows`: raw (guided) logits of positions `(rows[i], cols[i])` from the
        stored head inputs, computed a slice at a time."""
        B = state.ran.shape[0]

        def logits_fn(start: int, end: int) -> Tensor:
            r, c = rows[start:end], cols[start:end]
            logits = self.lm_head(state.hidden[r, c], state.cond[r])  # (k, V)
            if not guided:
                return logits
            uncond = self.lm_head(state.hidden[r + B, c], state.cond[r + B])
            return uncond + cfg.guidance_scale * (logits - uncond)

        return logits_fn

    def _warm_start(self, state: _WarmState, fp_rows, rows, canvas, active, cfg, guided):
        """The solver start of this call: None (h_pre), the previous z* (full) or a 3SR `WarmStart`. A row that has
        not been run yet in this block (no token to draw before) starts from h_pre (weight 0 on the empty state)."""
        if cfg.reuse == "none" or state.fixed_point is None or self.config.num_fp_layers == 0:
            return None
        fresh = ~state.ran[rows]  # (n,)
        if bool(fresh.all()):
            return None
        prev = state.fixed_point[fp_rows]
        if cfg.reuse == "full":
            if not bool(fresh.any()):
                return prev
            gamma = torch.ones(canvas.shape, dtype=torch.float32, device=canvas.device)
        else:
            gamma = three_state_gamma(
                state.canvas[rows],
                canvas,
                cfg.mask_token_id,
                active,
                cfg.gamma_mask_min,
                cfg.gamma_mask_max,
                cfg.gamma_changed,
            )  # (n, L)
        gamma = gamma.masked_fill(fresh[:, None], 0.0)
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
        logits_processor: Optional[Any] = None,
        generation_tokens_hook_func: Optional[Callable] = None,
        generation_logits_hook_func: Optional[Callable] = None,
        **kwargs,
    ):
        r"""Fill every masked position of a canvas, or continue a prompt by `max_new_tokens`.

        Args:
            input_ids (`(B, L)` integer ids): the prompt or canvas; `mask_token_id` marks positions to fill
                (infilling). When None, an all-masked canvas of `batch_size` x `seq_len` (or `bos_token_id`
                followed by `max_new_tokens` masks).
            attention_mask (`(B, L)`): 0 marks padding (left or right), which is never attended to nor filled.
            class_labels (`(B,)` integer ids): classes of a class-conditional model.
            generation_config: an [`FPMGMGenerationConfig`], a transformers `GenerationConfig` or a dict;
                defaults to `model.generation_config`.
            generator (`torch.Generator`): the only source of randomness.
            streamer: transformers' streamer protocol (`put`, `put_draft`, `end`; see `streaming_fpmgm`).
            callback: `callback(step, canvas)` after every step (steps counted across blocks).
            logits_processor: a transformers `LogitsProcessorList` (or list of processors) applied, before
                temperature / top-k / top-p, to the logits of the positions drawn at a step: `scores` is `(N, V)`, one
                row per drawn position, and `input_ids` `(N, L)` the canvas row of each.
            generation_tokens_hook_func / generation_logits_hook_func: Dream's hooks, `(step, x, logits)` with the
                canvas `x (B, L)` and the full logits `(B, L, V)`; they return the new canvas / logits.
            kwargs: any [`FPMGMGenerationConfig`] field, or a Dream / LLaDA / transformers name for one
                (`steps`, `gen_length`, `remasking`, `do_sample`), overriding it for this call.

        Returns:
            `LongTensor (B * num_return_sequences, L')`, or an [`FPMGMGenerationOutput`] with
            `return_dict_in_generate=True`.
        """
        if "inputs" in kwargs:  # transformers' and Dream's name for the prompt
            if input_ids is not None:
                raise ValueError("pass the prompt as `input_ids` or as `inputs`, not both.")
            input_ids = kwargs.pop("inputs")
        cfg = self._prepare_generation_config(generation_config, kwargs)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
        if callback is not None and not callable(callback):
            raise ValueError(f"`callback` must be callable as callback(step, canvas), got {type(callback).__name__}.")
        hooks = self._prepare_hooks(logits_processor, generation_tokens_hook_func, generation_logits_hook_func)
        emitter = StreamEmitter(streamer)
        canvas, active, labels, side = self._prepare_inputs(input_ids, attention_mask, class_labels, cfg)
        c = self.config
        plan = plan_budget(
            cfg.budget, cfg.num_steps, c.num_pre_layers, c.num_fp_layers, c.num_post_layers, cfg.fp_schedule,
            cfg.fp_iters_per_step,
        )
        was_training = self.training
        self.eval()  # training mode would run S-JFB draws instead of the planned iterations
        try:
            out = self._decode(canvas, active, labels, plan, cfg, generator, emitter, callback, hooks)
        finally:
            self.train(was_training)
        if side == "right":  # back to the caller's layout: tokens, then the new ones, then padding
            out.history = out.history and [pack(h, active, pads_first=False)[0] for h in out.history]
            out.sequences, out.attention_mask = pack(out.sequences, active, pads_first=False)
        return out if cfg.return_dict_in_generate else out.sequences

    def diffusion_generate(self, inputs: Optional[Tensor] = None, generation_config=None, **kwargs):
        r"""Dream's entry point: `generate` under Dream's argument names (`inputs`, `steps`, `alg`, `alg_temp`,
        `temperature`, `top_p`, `top_k`, `max_new_tokens`, `output_history`, `return_dict_in_generate`).
        `alg="origin"` is the ancestral (MDLM) step; the other algs rank positions in the confidence sampler."""
        return self.generate(inputs, generation_config=generation_config, **kwargs)

    @staticmethod
    def _prepare_hooks(processors, tokens_hook, logits_hook) -> _Hooks:
        from transformers import LogitsProcessorList

        if processors is not None:
            if not isinstance(processors, LogitsProcessorList):
                if not isinstance(processors, (list, tuple)) or not all(callable(p) for p in processors):
                    raise ValueError("`logits_processor` must be a transformers LogitsProcessorList or a list of "
                                     f"processors, got {type(processors).__name__}.")
                processors = LogitsProcessorList(processors)
        for name, hook in (("generation_tokens_hook_func", tokens_hook), ("generation_logits_hook_func", logits_hook)):
            if hook is not None and not callable(hook):
                raise ValueError(f"`{name}` must be callable as {name}(step, x, logits), got {type(hook).__name__}.")
        return _Hooks(processors or None, tokens_hook, logits_hook)

    def _decode(self, canvas, active, labels, plan, cfg, generator, emitter, callback, hooks: _Hooks):
        """The block loop: each block is denoised in its window, then the EOS rule and the streamer run."""
        mask_id, B = cfg.mask_token_id, canvas.shape[0]
        generated = (canvas == mask_id) & active
        start = first_masked_column(canvas, active, mask_id)
        blocks = plan_blocks(start, canvas.shape[1], cfg.block_length, self.config.max_position_embeddings)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids or [None])[0]
        out = FPMGMGenerationOutput(
            block_passes=torch.zeros(B, dtype=torch.long, device=canvas.device),
            num_steps=len(plan),
            nfe=torch.zeros(B, dtype=torch.long, device=canvas.device),
            budget=cfg.budget,
            step_stats=[],
            history=[] if cfg.output_history else None,
            attention_mask=active,
            num_blocks=0,
        )
        emitter.prompt(canvas[:, :start])
        canvas = canvas.clone()
        bar = _progress(cfg.progress_bar, len(blocks) * len(plan))
        for index, (s, e, ws, we) in enumerate(blocks):
            fill = active.clone()
            fill[:, :s], fill[:, e:] = False, False
            if bool(((canvas == mask_id) & fill).any()):
                window = _Window(active[:, ws:we], fill[:, ws:we], (s - ws, e - ws), index)
                on_step = self._step_hook(canvas, (ws, we), window, out, emitter, callback, bar)
                decoded = self._sample_loop(canvas[:, ws:we], window, labels, plan, cfg, generator, out, on_step,
                                            hooks)
                canvas[:, ws:we] = decoded
                out.num_blocks += 1
            if cfg.eos_ids:
                canvas = apply_eos(canvas, generated, cfg.eos_ids, pad)
            emitter.final(canvas[:, s:e])
            if cfg.eos_ids and bool(eos_reached(canvas, generated, cfg.eos_ids).all()):
                break  # every row has ended: the rest is padding already
        emitter.end()
        if bar is not None:
            bar.close()
        out.sequences = canvas
        return out

    def _step_hook(self, canvas, columns, window: _Window, out, emitter, callback, bar=None):
        """After every step: history and callback see the whole canvas, the streamer the block's tokens."""
        ws, we = columns
        s, e = window.block
        whole = ws == 0 and we == canvas.shape[1]
        first_step = len(out.step_stats)

        def on_step(step: int, win: Tensor) -> None:
            if out.history is not None or callback is not None:
                full = win if whole else torch.cat([canvas[:, :ws], win, canvas[:, we:]], 1)
                if out.history is not None:
                    out.history.append(full.clone())
                if callback is not None:
                    callback(first_step + step, full)
            emitter.draft(win[:, s:e])
            if bar is not None:
                bar.update(1)

        return on_step

    def _sample_loop(self, canvas, window: _Window, labels, plan, cfg, generator, out, on_step, hooks) -> Tensor:
        """Denoise one window for `len(plan)` steps; accumulates passes, nfe and step stats into `out`. Each step
        first picks the positions whose token is drawn (ancestral: those that unmask; confidence: every masked one),
        runs the network only for rows with a pick (`use_cache`), then computes the output head and the float64
        draw at the picked positions only."""
        B, T, mask_id = canvas.shape[0], len(plan), cfg.mask_token_id
        guided = cfg.guidance_scale is not None and labels is not None
        state = _WarmState(B, canvas.device)
        initial_masked = ((canvas == mask_id) & window.fill).sum(1)
        order = self._reveal_order(cfg, canvas.shape[1])
        for i, fp_iters in enumerate(plan):
            # times from 1 down to time_eps (Dream's eps); the last step reveals whatever is left
            t = 1 - (1 - cfg.time_eps) * i / T
            s = 1 - (1 - cfg.time_eps) * (i + 1) / T if i < T - 1 else 0.0
            masked = (canvas == mask_id) & window.fill  # (B, L)
            pick = ancestral_reveal(canvas, t, s, mask_id, window.fill, generator, cfg.noise_eps) if (
                cfg.sampler == "ancestral") else masked
            rows = self._rows_to_run(canvas, pick, window.fill, cfg)
            stats = {
                "fp_iters": fp_iters,
                "iterations": torch.zeros_like(out.nfe),
                "residual": torch.full((B,), float("nan")),
                "ran": torch.zeros(B, dtype=torch.bool),
                "diverged": torch.zeros(B, dtype=torch.bool),
                "cold_start": torch.zeros(B, dtype=torch.bool),
                "block": window.index,
            }
            if rows.numel():
                self._run_rows(state, rows, canvas, window.active, labels, t, fp_iters, cfg, guided, out, stats)
                out.nfe[rows] += 1
            canvas, logits = self._transition(state, canvas, pick, i, T, initial_masked, window.fill, order, guided,
                                              cfg, generator, hooks)
            if hooks.tokens is not None:
                canvas = self._checked(hooks.tokens(i, canvas, logits), canvas, "generation_tokens_hook_func")
            out.step_stats.append(stats)
            on_step(i, canvas)
        return canvas

    def _transition(self, state, canvas, pick, i, T, initial_masked, fill, order, guided, cfg, generator, hooks):
        """One sampler step: tokens (and, for the confidence sampler, their scores) drawn at the picked positions
        only, from the logits of each row's last network call. Returns the canvas and, with a Dream hook, the full
        logits `(B, L, V)` (else None)."""
        rows, cols = pick.nonzero(as_tuple=True)  # (N,), (N,)
        ranked = cfg.sampler == "confidence" and order is None
        alg = (cfg.alg or "maskgit_plus") if ranked else None
        full = None
        logits_fn = self._logits_at(state, rows, cols, guided, cfg)
        if hooks.full_logits and state.hidden is not None:
            B, L = canvas.shape
            every_row = torch.arange(B, device=canvas.device).repeat_interleave(L)  # (B * L,)
            every_col = torch.arange(L, device=canvas.device).repeat(B)
            full = self._logits_at(state, every_row, every_col, guided, cfg)(0, B * L).view(B, L, -1)
            if hooks.logits is not None:
                full = self._checked(hooks.logits(i, canvas, full), full, "generation_logits_hook_func")
            logits_fn = lambda a, b: full[rows[a:b], cols[a:b]]  # noqa: E731
        tokens, scores = draw_rows(
            logits_fn, rows.numel(), self.config.vocab_size, cfg.mask_token_id, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, alg=alg, rank_unsharpened=cfg.temperature == 0,
            device=canvas.device, processors=hooks.processors, rows_fn=lambda a, b: canvas[rows[a:b]])
        drawn = canvas.clone()
        drawn[rows, cols] = tokens
        if cfg.sampler == "ancestral":
            return drawn, full
        score = None
        if ranked:
            score = torch.zeros(canvas.shape, dtype=torch.float64, device=canvas.device)
            score[rows, cols] = scores
        return confidence_select(canvas, drawn, score, i, T, initial_masked, cfg.mask_token_id, fill, generator,
                                 cfg.randomness, cfg.mask_schedule, order, cfg.alg_temp), full

    @staticmethod
    def _checked(value, like: Tensor, name: str) -> Tensor:
        """A hook's return value: a tensor shaped like what it was given."""
        if not isinstance(value, torch.Tensor) or value.shape != like.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"`{name}` must return a tensor of shape {tuple(like.shape)}, got {got}.")
        return value.to(like.device)

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

    def _rows_to_run(self, canvas, pick, fill, cfg):
        """Rows that need a network call. With the cache (default) only rows with a token to draw: a step that
        reveals nothing in a row needs no output from it (exact, with or without time conditioning). Without it,
        every row with a masked position, at every step (e.g. to follow the solver across all steps)."""
        if cfg.use_cache:
            need = pick.any(1)
        else:
            need = ((canvas == cfg.mask_token_id) & fill).any(1)
        return need.nonzero().squeeze(1)

    def _run_rows(self, state, rows, canvas, active, labels, t, fp_iters, cfg, guided, out, stats):
        B, n = canvas.shape[0], rows.numel()
        fp_rows = torch.cat([rows, rows + B]) if guided else rows  # guided state holds [cond; null] rows
        sub_canvas, sub_active = canvas[rows], active[rows]
        init = self._warm_start(state, fp_rows, rows, sub_canvas, sub_active, cfg, guided)
        sub_labels = None if labels is None else labels[rows]
        net = self._denoise(sub_canvas, sub_active, sub_labels, t, fp_iters, init, cfg)
        if state.hidden is None:
            width = (2 if guided else 1) * B
            state.hidden = net.last_hidden_state.new_zeros((width,) + net.last_hidden_state.shape[1:])
            state.cond = net.conditioning.new_zeros((width,) + net.conditioning.shape[1:])
            state.fixed_point = net.fixed_point.new_zeros((width,) + net.fixed_point.shape[1:])
            state.canvas = canvas.clone()
        state.hidden[fp_rows] = net.last_hidden_state
        state.cond[fp_rows] = net.conditioning
        state.fixed_point[fp_rows] = net.fixed_point
        state.canvas[rows] = sub_canvas
        state.ran[rows] = True
        out.block_passes[rows] += net.block_passes[:n]
        stats["iterations"][rows] = net.solver_stats.iterations[:n]
        stats["residual"][rows.cpu()] = net.solver_stats.residual[:n].float().cpu()
        stats["ran"][rows.cpu()] = True
        for flag in ("diverged", "cold_start"):  # the solver's safety net (FPMGMConfig.fp_divergence_patience)
            value = getattr(net.solver_stats, flag, None)
            if value is not None:
                stats[flag][rows.cpu()] = value[:n].cpu()
        if net.solver_stats.trace is not None:
            trace = torch.full((B, net.solver_stats.trace.shape[1]), float("nan"))
            trace[rows.cpu()] = net.solver_stats.trace[:n].float().cpu()
            stats["trace"] = trace

    # ------------------------------------------------------------------------------------ saving / loading

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also declare the pipelines shipped with the model (`config.custom_pipelines`): this relative import
        makes transformers copy `pipeline_fpmgm.py` next to the weights, for `pipeline(..., trust_remote_code=...)`."""
        from .pipeline_fpmgm import custom_pipelines

        if self.generation_config is not None:
            self.generation_config.validate()  # refuse before anything is written, not at the next load
        self.config.custom_pipelines = custom_pipelines(self.config)
        return super().save_pretrained(save_directory, *args, **kwargs)

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
