"""Fixed-Point Masked Generative Models: an MDLM-style DiT denoiser whose middle blocks are replaced
by a fixed-point solve over one shared block (arXiv 2605.31215, §3.1).

Hub-portable: imports only torch, transformers, the standard library and sibling files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_fpmgm import FPMGMConfig
from .fixed_point_fpmgm import (
    WARM_START_MAX_RATIO,
    FPMGMInjection,
    WarmStart,
    differentiable_residual,
    init_decay_log,
    init_injection_linear,
    jacobian_frobenius,
)
from .generation_fpmgm import FPMGMGenerationMixin
from .layers_fpmgm import (  # noqa: F401  (the layers' public names stay importable from here)
    FPMGMAttention,
    FPMGMBlock,
    FPMGMConditioning,
    FPMGMFinalLayer,
    FPMGMLayerNorm,
    FPMGMTimestepEmbedder,
    ZeroInitLinear,
    apply_rotary,
    eager_attention_forward,
    modulate,
    rotary_tables,
)
from .loss_fpmgm import mdlm_nelbo
from .solver_fpmgm import SolverStats, get_solver, relative_residual
from .validation_fpmgm import CheckedWeightsMixin

Tensor = torch.Tensor


HIDDEN_STATES_DOC = """hidden_states (`tuple` of `(B, L, D)`, with `output_hidden_states=True`): the embeddings, the
        output of each pre block, the fixed point `z*` (one entry, standing for the whole implicit middle, however many
        iterations the solver ran), and the output of each post block. `last_hidden_state` is the last entry.
    attentions (`tuple` of `(B, H, L, L)`, with `output_attentions=True`): the attention weights of each pre block,
        of each shared block at the fixed point `z*` (one extra, uncounted evaluation of the map), and of each post
        block. They are computed by the eager kernel whatever `attn_implementation` is."""


@dataclass
class FPMGMModelOutput(ModelOutput):
    __doc__ = f"""Output of [`FPMGMModel`].

    last_hidden_state (`(B, L, D)`): output of the post blocks (before the final norm).
    conditioning (`(B, cond_dim)`): the adaLN conditioning vector.
    fixed_point (`(B, L, D)`): the solver's `z*` (the pre-block output when `num_fp_layers=0`).
    pre_fixed_point (`(B, L, D)`): `h_pre`, the output of the pre blocks.
    solver_stats ([`SolverStats`]): per-sample iterations and final relative residual.
    block_passes (`LongTensor (B,)`): transformer-block evaluations, K_pre + iterations * K_fp + K_post.
    fixed_point_loss (scalar): training mode with `fp_jacobian_reg` / `fp_residual_reg` > 0: the weighted
        regulariser of the fixed-point map; the objectives add it to the task loss.
    {HIDDEN_STATES_DOC}
    """

    last_hidden_state: Optional[Tensor] = None
    conditioning: Optional[Tensor] = None
    fixed_point: Optional[Tensor] = None
    pre_fixed_point: Optional[Tensor] = None
    solver_stats: Optional[SolverStats] = None
    block_passes: Optional[Tensor] = None
    fixed_point_loss: Optional[Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class FPMGMOutput(ModelOutput):
    __doc__ = f"""Output of [`FPMGMForMaskedGeneration`].

    loss (scalar, with `labels`): MDLM's NELBO of the labels (fixed-point regulariser included in training mode).
    logits (`(B, L, V)`): raw token scores (SUBS and sampling live outside the model); with `labels`, of the masked
        canvas the loss drew.
    last_hidden_state (`(B, L, D)`): final pre-logit states (post-block output), used by the consistency loss.
    fixed_point (`(B, L, D)`): `z*` per token, to warm-start the next denoising step.
    pre_fixed_point (`(B, L, D)`): `h_pre`, for three-state reuse.
    solver_stats ([`SolverStats`]): per-sample iterations and final relative residual.
    block_passes (`LongTensor (B,)`): transformer-block evaluations of this call.
    fixed_point_loss (scalar): the weighted fixed-point regulariser in training mode (see [`FPMGMModelOutput`]).
    {HIDDEN_STATES_DOC}
    """

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    last_hidden_state: Optional[Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    fixed_point: Optional[Tensor] = None
    pre_fixed_point: Optional[Tensor] = None
    solver_stats: Optional[SolverStats] = None
    block_passes: Optional[Tensor] = None
    fixed_point_loss: Optional[Tensor] = None


# ----------------------------------------------------------------------------------------------- models


class FPMGMPreTrainedModel(CheckedWeightsMixin, PreTrainedModel):
    config_class = FPMGMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FPMGMBlock"]
    _repeated_blocks = ["FPMGMBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and hasattr(module, "_fpmgm_role"):
            init_injection_linear(module, std)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, FPMGMLayerNorm):
            init.ones_(module.weight)
        elif isinstance(module, FPMGMInjection) and module.kind == "constrained":
            init_decay_log(module.decay_log, module.decay_init)

    def compile_repeated_blocks(self, *args, **kwargs) -> None:
        """Regional compilation: `torch.compile` each transformer block in place (arguments go to
        `nn.Module.compile`), as diffusers' method of the same name does. Every block has one class and, within a
        `generate` call, one input shape, so one compiled graph serves the pre, shared and post blocks and every
        solver iteration; the solver, sampler and step loop stay eager, so a new budget, reuse mode or step count
        compiles nothing new. Weights and state-dict keys are unchanged (bench/compile_speed.py, docs/generation.md).
        """
        blocks = [m for m in self.modules() if type(m).__name__ in self._repeated_blocks]
        if not blocks:
            raise ValueError(f"no module of the classes {self._repeated_blocks} (`_repeated_blocks`) to compile.")
        for block in blocks:
            block.compile(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `_auto_class` holds one name; both entries must reach config.json for the Hub.
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = {
                "AutoConfig": "configuration_fpmgm.FPMGMConfig",
                "AutoModel": f"modeling_fpmgm.{type(self).__name__}",
                "AutoModelForMaskedLM": f"modeling_fpmgm.{type(self).__name__}",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)


class FPMGMModel(FPMGMPreTrainedModel):
    """Embedding -> pre blocks -> fixed point over the shared block(s) -> post blocks (no output head)."""

    def __init__(self, config: FPMGMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.conditioning = FPMGMConditioning(config)
        self.pre_blocks = nn.ModuleList(FPMGMBlock(config) for _ in range(config.num_pre_layers))
        self.injection = FPMGMInjection(config) if config.num_fp_layers else None
        self.fp_norm = FPMGMLayerNorm(config.hidden_size) if config.num_fp_layers and config.fp_state_norm else None
        self.fp_blocks = nn.ModuleList(FPMGMBlock(config) for _ in range(config.num_fp_layers))
        self.post_blocks = nn.ModuleList(FPMGMBlock(config) for _ in range(config.num_post_layers))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _check_inputs(self, input_ids, class_labels, attention_mask):
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"`input_ids` has length {input_ids.shape[1]} > max_position_embeddings={cfg.max_position_embeddings}."
            )
        values = not input_ids.is_meta  # a meta tensor has shapes but no values (shape inference, model sizing)
        if values and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"`input_ids` must lie in [0, {cfg.vocab_size}), the vocabulary of this model.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(attention_mask.shape)} must equal "
                f"`input_ids` shape {tuple(input_ids.shape)}."
            )
        if class_labels is not None:
            if not cfg.num_classes:
                raise ValueError("`class_labels` was given but the model is unconditional (config.num_classes=0).")
            if class_labels.shape != (input_ids.shape[0],):
                raise ValueError(
                    f"`class_labels` must have shape ({input_ids.shape[0]},), got {tuple(class_labels.shape)}."
                )
            if values and (int(class_labels.min()) < 0 or int(class_labels.max()) > cfg.num_classes):
                raise ValueError(
                    f"`class_labels` must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class), "
                    f"got values in [{int(class_labels.min())}, {int(class_labels.max())}]."
                )

    def _positions(self, length: int, device) -> Tensor:
        idx = torch.arange(length, device=device)
        if self.config.position_encoding == "rope_2d":
            cols = self.config.grid_size[1]
            return torch.stack([idx // cols, idx % cols], dim=-1)  # (L, 2): (row, col)
        return idx[:, None]  # (L, 1)

    def forward(
        self,
        input_ids: Tensor,
        timesteps: Optional[Tensor] = None,
        class_labels: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        fixed_point_init: Optional[Union[Tensor, WarmStart]] = None,
        fp_iters: Optional[int] = None,
        fp_tol: Optional[float] = None,
        fp_trace: bool = False,
        generator: Optional[torch.Generator] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[FPMGMModelOutput, tuple]:
        r"""
        Args:
            input_ids (`LongTensor (B, L)`): the canvas; `config.mask_token_id` marks masked positions.
            timesteps (`FloatTensor (B,)` or scalar): noise level fed to the timestep embedder; ignored
                unless `config.time_conditioning`.
            class_labels (`LongTensor (B,)`): class ids in [0, num_classes]; `num_classes` is the null class.
            attention_mask (`(B, L)`, 1 = token, 0 = padding): padded keys are never attended to.
            fixed_point_init (`Tensor (B, L, D)` or [`WarmStart`]): solver start; default `h_pre`.
            fp_iters (`int`): eval-mode iterations (default `config.fp_max_iter`).
            fp_tol (`float`): eval-mode per-sample relative-residual tolerance (default `config.fp_tol`;
                0 disables early stopping).
            fp_trace (`bool`): eval mode: also record the residual of every iteration (`solver_stats.trace`).
            generator (`torch.Generator`): draws the S-JFB iteration counts in training mode.
            output_hidden_states / output_attentions (`bool`, default from the config): see [`FPMGMModelOutput`].
        """
        cfg = self.config
        return_dict = cfg.return_dict if return_dict is None else return_dict
        want_hidden = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        want_attn = cfg.output_attentions if output_attentions is None else output_attentions
        self._check_inputs(input_ids, class_labels, attention_mask)
        B, L = input_ids.shape
        token_mask = None if attention_mask is None else attention_mask.bool()  # (B, L)
        attn_mask = None if token_mask is None else token_mask[:, None, None, :]  # (B, 1, 1, L) keys
        c = self.conditioning(B, input_ids.device, timesteps, class_labels)  # (B, cond_dim)
        rope = rotary_tables(self._positions(L, input_ids.device), cfg.head_dim)
        hidden, attn = ([] if want_hidden else None), ([] if want_attn else None)
        x = self.embed_tokens(input_ids)  # (B, L, D)
        x = self._stack(self.pre_blocks, x, c, rope, attn_mask, hidden, attn)
        h_pre = x
        z, stats, penalty, f = self._fixed_point(
            h_pre, c, rope, attn_mask, token_mask, fixed_point_init, (fp_iters, fp_tol, fp_trace), generator
        )
        if hidden is not None and f is not None:
            hidden.append(z)
        if attn is not None and f is not None:
            with torch.no_grad():
                f(z, None, attn)  # the shared block's attention at the fixed point (not counted as a pass)
        x = self._stack(self.post_blocks, z, c, rope, attn_mask, hidden, attn)
        passes = (cfg.num_pre_layers + cfg.num_post_layers) + stats.iterations * cfg.num_fp_layers
        out = FPMGMModelOutput(
            last_hidden_state=x,
            conditioning=c,
            fixed_point=z,
            pre_fixed_point=h_pre,
            solver_stats=stats,
            block_passes=passes,
            fixed_point_loss=penalty,
            hidden_states=None if hidden is None else tuple(hidden),
            attentions=None if attn is None else tuple(attn),
        )
        return out if return_dict else out.to_tuple()

    @staticmethod
    def _stack(blocks, x, c, rope, attn_mask, hidden: Optional[list], attn: Optional[list]) -> Tensor:
        """Run explicit blocks in order; `hidden` collects the input then every output, `attn` the weights."""
        if hidden is not None and not hidden:
            hidden.append(x)  # the embeddings
        for block in blocks:
            x = block(x, c, rope, attn_mask, attn)
            if hidden is not None:
                hidden.append(x)
        return x

    def _initial_state(self, h_pre: Tensor, fixed_point_init) -> tuple[Tensor, Optional[Tensor]]:
        """The solver start `(B, L, D)` and, with the safety net on, which rows had their warm start rejected
        `(B,)` (None when no warm start was given)."""
        if fixed_point_init is None:
            return h_pre, None
        if isinstance(fixed_point_init, WarmStart):
            gamma = fixed_point_init.gamma.to(h_pre.dtype).unsqueeze(-1)  # (B, L, 1)
            z0 = torch.lerp(h_pre, fixed_point_init.state.to(h_pre.dtype), gamma)  # gamma*state + (1-gamma)*h_pre
        else:
            if fixed_point_init.shape != h_pre.shape:
                raise ValueError(
                    f"`fixed_point_init` shape {tuple(fixed_point_init.shape)} must be {tuple(h_pre.shape)}."
                )
            z0 = fixed_point_init.to(h_pre.dtype)
        if self.config.fp_divergence_patience is None or z0.is_meta:
            return z0, None
        # A warm start carrying a non-finite or exploding state (an expansive map iterated across steps) would
        # only feed the explosion: such rows start from h_pre instead.
        z_norm = torch.linalg.vector_norm(z0.detach(), dim=(1, 2), dtype=torch.float32)  # (B,)
        h_norm = torch.linalg.vector_norm(h_pre.detach(), dim=(1, 2), dtype=torch.float32)
        rejected = ~torch.isfinite(z_norm) | (z_norm > WARM_START_MAX_RATIO * h_norm.clamp_min(1e-6))
        return torch.where(rejected[:, None, None], h_pre, z0), rejected  # no host sync: a `where` is cheap

    def _fixed_point(self, h_pre, c, rope, attn_mask, token_mask, fixed_point_init, solve_args, generator):
        """`(z*, stats, penalty, f)`: the solve from the start `_initial_state` gives, and the map `f(z, rows,
        attn_sink=None)` (None without fixed-point blocks)."""
        B = h_pre.shape[0]
        if not self.config.num_fp_layers:
            return h_pre, SolverStats.empty(B, h_pre.device), None, None
        injected = self.injection.prepare(h_pre)  # (B, L, D) or (B, L, 2D) or None; fixed across iterations

        def f(z: Tensor, rows: Optional[Tensor], attn_sink: Optional[list] = None) -> Tensor:
            c_r, inj_r, m_r = c, injected, attn_mask
            if rows is not None:
                c_r = c[rows]
                inj_r = None if injected is None else injected[rows]
                m_r = None if attn_mask is None else attn_mask[rows]
            if self.fp_norm is not None:  # bounds the map's range (see FPMGMConfig.fp_state_norm)
                z = self.fp_norm(z)
            z = self.injection(z, inj_r)
            for block in self.fp_blocks:
                z = block(z, c_r, rope, m_r, attn_sink)
            return z

        z0, rejected = self._initial_state(h_pre, fixed_point_init)
        if self.training:
            z, stats, penalty = self._sjfb(f, z0, token_mask, generator)
        else:
            (z, stats), penalty = self._solve(f, z0, token_mask, *solve_args), None
        if rejected is not None:
            stats.cold_start = rejected
        return z, stats, penalty, f

    def _solve(self, f, z0, token_mask, fp_iters, fp_tol, trace=False):
        cfg = self.config
        max_iter = cfg.fp_max_iter if fp_iters is None else fp_iters
        if z0.is_meta:  # shapes only (meta device): iterate the map; residuals and stopping need values
            z = z0
            for _ in range(max_iter):
                z = f(z, None)
            stats = SolverStats.empty(z0.shape[0], z0.device)
            stats.iterations += max_iter
            return z, stats
        tol = cfg.fp_tol if fp_tol is None else (fp_tol or None)
        patience = cfg.fp_divergence_patience
        kwargs = dict(divergence_patience=patience, on_nonfinite="raise" if patience is None else "flag")
        if cfg.fp_solver == "anderson":
            kwargs.update(memory=cfg.anderson_memory, beta=cfg.anderson_beta, lam=cfg.anderson_lam)
        return get_solver(cfg.fp_solver)(f, z0, max_iter=max_iter, tol=tol, mask=token_mask, trace=trace, **kwargs)

    def _sjfb(self, f, z0, token_mask, generator):
        """Stochastic Jacobian-free backprop: n ~ U{nograd} iterations without a graph, then
        m ~ U{grad} iterations with one. Gradients reach the shared block only through the last m.
        Returns `(z, stats, penalty)`; `penalty` is the weighted fixed-point regulariser or None."""
        cfg = self.config
        (n_lo, n_hi), (m_lo, m_hi) = cfg.fp_train_nograd_iters, cfg.fp_train_grad_iters
        draws = torch.randint(0, 2**31 - 1, (2,), generator=generator).tolist()
        n = n_lo + draws[0] % (n_hi - n_lo + 1)
        m = m_lo + draws[1] % (m_hi - m_lo + 1)
        z = z0
        if n:
            with torch.no_grad():
                z, _ = self._solve(f, z0.detach(), token_mask, n, 0)
        for _ in range(m):
            z_prev, z = z, f(z, None)
        stats = SolverStats.empty(z0.shape[0], z0.device)
        stats.iterations += n + m
        stats.residual = relative_residual(z.detach(), z_prev.detach(), token_mask)
        penalty = None
        if cfg.fp_residual_reg > 0 and self._paid_step(cfg.fp_residual_reg_prob, generator):
            penalty = self._residual_penalty(f, z, z_prev, token_mask)
        if cfg.fp_jacobian_reg > 0 and self._paid_step(cfg.fp_jacobian_reg_prob, generator):
            jac = cfg.fp_jacobian_reg * jacobian_frobenius(f, z, token_mask, generator)
            penalty = jac if penalty is None else penalty + jac
        return z, stats, penalty

    def _residual_penalty(self, f, z, z_prev, token_mask):
        """The weighted relative-residual penalty: at the last graph iteration (`z_prev -> z`), or after
        `fp_residual_reg_iters` more no-grad iterations on one more graph iteration; hinged at
        `fp_residual_reg_tol`."""
        cfg = self.config
        if cfg.fp_residual_reg_iters:
            with torch.no_grad():
                z_prev, _ = self._solve(f, z.detach(), token_mask, cfg.fp_residual_reg_iters, 0)
            z = f(z_prev, None)
        r = differentiable_residual(z, z_prev, token_mask)
        return cfg.fp_residual_reg * (r - cfg.fp_residual_reg_tol).clamp_min(0)

    @staticmethod
    def _paid_step(prob: float, generator) -> bool:
        """Whether this training forward pays for a penalty applied with probability `prob` (a draw only when
        it is not always)."""
        return prob >= 1 or bool(torch.rand((), generator=generator) < prob)


class FPMGMForMaskedGeneration(FPMGMGenerationMixin, FPMGMPreTrainedModel):
    """[`FPMGMModel`] with MDLM's final layer: logits over the vocabulary for every position.

    The model never samples: samplers, schedules and warm starts live in the generation mixin.
    """

    _tied_weights_keys = {"lm_head.linear.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FPMGMConfig):
        super().__init__(config)
        self.model = FPMGMModel(config)
        self.lm_head = FPMGMFinalLayer(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head.linear

    def set_output_embeddings(self, value):
        self.lm_head.linear = value

    def forward(
        self,
        input_ids: Tensor,
        timesteps: Optional[Tensor] = None,
        class_labels: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        fixed_point_init: Optional[Union[Tensor, WarmStart]] = None,
        fp_iters: Optional[int] = None,
        fp_tol: Optional[float] = None,
        fp_trace: bool = False,
        generator: Optional[torch.Generator] = None,
        labels: Optional[Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[FPMGMOutput, tuple]:
        r"""Same arguments as [`FPMGMModel.forward`]; returns [`FPMGMOutput`] with `logits (B, L, V)`.

        labels (`LongTensor (B, L)`): clean tokens; the call then draws a time and a mask as MDLM's NELBO does (from
            `generator`, else torch's default generator), runs the model on that canvas and returns the NELBO as
            `loss`, the objective `fpmgm-train` minimises, so `transformers.Trainer` trains the model as is. Positions
            labelled -100 are not scored and stay visible as context, with their token from `input_ids`.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        kwargs = dict(class_labels=class_labels, attention_mask=attention_mask, fixed_point_init=fixed_point_init,
                      fp_iters=fp_iters, fp_tol=fp_tol, fp_trace=fp_trace, output_hidden_states=output_hidden_states,
                      output_attentions=output_attentions)
        if labels is not None:
            result = self._labelled(input_ids, labels, generator, kwargs)
        else:
            out = self.model(input_ids, timesteps=timesteps, generator=generator, return_dict=True, **kwargs)
            result = FPMGMOutput(
                logits=self.lm_head(out.last_hidden_state, out.conditioning),
                last_hidden_state=out.last_hidden_state,
                hidden_states=out.hidden_states,
                attentions=out.attentions,
                fixed_point=out.fixed_point,
                pre_fixed_point=out.pre_fixed_point,
                solver_stats=out.solver_stats,
                block_passes=out.block_passes,
                fixed_point_loss=out.fixed_point_loss,
            )
        return result if return_dict else result.to_tuple()

    def _labelled(self, input_ids: Tensor, labels: Tensor, generator, kwargs: dict) -> FPMGMOutput:
        """The NELBO of `labels` (see `forward`): `loss` plus the outputs of the masked canvas it drew."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"`labels` shape {tuple(labels.shape)} must equal `input_ids` shape "
                             f"{tuple(input_ids.shape)}.")
        if labels.is_meta:
            raise ValueError("`labels` on the meta device: the loss draws masks from token values, which a meta "
                             "tensor does not have (a forward without labels gives the output shapes).")
        scored = labels != -100  # (B, L)
        x0 = torch.where(scored, labels, input_ids)
        attention_mask = kwargs.pop("attention_mask")
        loss, aux = mdlm_nelbo(self, x0, generator=generator, attention_mask=attention_mask, model_kwargs=kwargs,
                               loss_mask=scored)
        return FPMGMOutput(**{**aux["output"], "loss": loss})
