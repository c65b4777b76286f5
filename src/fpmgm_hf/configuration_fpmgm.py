"""Configuration of Fixed-Point Masked Generative Models (FP-MGM).

Hub-portable: imports only the standard library, transformers and sibling files.
"""

from __future__ import annotations

import math
from functools import partial

from transformers import PretrainedConfig

from .validation_fpmgm import check_float, check_int, check_range, fail

INJECTIONS = ("constrained", "concat_mlp", "add", "none")
SOLVERS = ("picard", "anderson")
POSITION_ENCODINGS = ("rope_1d", "rope_2d")

# Sizes beyond these would take minutes to build or end in a raw allocator error; a config asking for them is
# refused up front, naming the field (larger than any published masked diffusion model by orders of magnitude).
LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 15, "num_attention_heads": 1 << 10, "mlp_ratio": 64,
          "cond_dim": 1 << 15, "max_position_embeddings": 1 << 20, "num_classes": 1 << 20, "num_pre_layers": 512,
          "num_fp_layers": 64, "num_post_layers": 512, "fp_max_iter": 10_000, "anderson_memory": 64,
          "fp_divergence_patience": 10_000, "fp_train_iters": 1_000}
MAX_PARAMETERS = 1 << 37  # about 137 billion: an estimate above it is refused before anything is allocated

# The shared checks, bound to this config's name for the error messages.
_fail = partial(fail, "FPMGMConfig")
_check_int = partial(check_int, "FPMGMConfig")
_check_float = partial(check_float, "FPMGMConfig")
_check_range = partial(check_range, "FPMGMConfig")


class FPMGMConfig(PretrainedConfig):
    r"""Configuration of [`FPMGMForMaskedGeneration`].

    The denoiser is `embed -> num_pre_layers DiT blocks -> fixed point over num_fp_layers shared blocks
    -> num_post_layers DiT blocks -> final layer`. With `num_fp_layers=0` it is a plain MDLM-style DiT
    stack of `num_pre_layers + num_post_layers` blocks (the baseline and the conversion teacher).

    Args:
        vocab_size (`int`, defaults to 50258): tokens, mask token included (GPT-2's 50257 + 1).
        mask_token_id (`int`, defaults to 50257): id of the absorbing mask token.
        hidden_size (`int`, defaults to 768): width D.
        num_attention_heads (`int`, defaults to 12): heads; must divide `hidden_size`.
        mlp_ratio (`int`, defaults to 4): MLP width is `mlp_ratio * hidden_size`.
        cond_dim (`int`, defaults to 128): width of the adaLN conditioning vector.
        max_position_embeddings (`int`, defaults to 1024): longest canvas.
        dropout (`float`, defaults to 0.1): residual dropout.
        time_conditioning (`bool`, defaults to False): feed `timesteps` to the conditioning (MDLM-OWT: off).
        num_classes (`int`, defaults to 0): 0 = unconditional; `> 0` adds a class embedding with an extra
            null class (id `num_classes`) for classifier-free guidance.
        tie_word_embeddings (`bool`, defaults to False): tie the output projection to the input embedding.
        num_pre_layers / num_fp_layers / num_post_layers (`int`, defaults to 1/1/1): block counts.
        injection (`str`, defaults to `"constrained"`): how the shared block sees `h_pre`:
            `"constrained"`: `A * z + (1 - A) * G(h_pre)` with a per-channel `A = exp(-exp(a))` in (0, 1) and a
            Linear G initialised to the identity. The linear part is a contraction by construction and the
            pre-LN block adds a bounded amount, so the state stays bounded; at one iteration from `h_pre` the
            map is exactly `block(h_pre)` (exact MDLM conversion). Elementwise cost per iteration.
            `"concat_mlp"`: the paper's (FPDM's) map, Linear G then MLP(concat(z, G(h_pre))) 2D->2D->D
            initialised to the identity in z; nothing bounds its gain (see docs/stability). `"add"`
            (z + G(h_pre)) or `"none"`.
        fp_decay_init (`float`, defaults to 0.5): initial `A` of the constrained injection, in (0, 1).
        fp_state_norm (`bool`, defaults to False): LayerNorm the state before the injection, i.e. iterate
            `z <- F(G(LN(z)), h_pre)`. The paper's map (False) has no such norm; nothing then bounds the state, and
            small models trained with few S-JFB iterations inflate it geometrically when iterated longer
            (as DEQ transformers do, the norm keeps the map on a bounded set so 3SR and large budgets stay finite).
        fp_solver (`str`, defaults to `"picard"`): `"picard"` (plain iteration) or `"anderson"`.
        fp_max_iter (`int`, defaults to 8): iterations per forward in eval mode.
        fp_tol (`float` or None, defaults to None): relative-residual stopping threshold per sample;
            None always runs `fp_max_iter` iterations.
        fp_divergence_patience (`int` or None, defaults to 5): the solver's safety net: a sample whose residual
            rises this many iterations in a row (or turns non-finite) stops at its best iterate and is flagged in
            `solver_stats.diverged`; a warm start that is non-finite or far larger than `h_pre` is replaced by
            `h_pre` (`solver_stats.cold_start`). None restores the strict behaviour (non-finite iterates raise).
        fp_jacobian_reg (`float`, defaults to 0.0): training only: weight of the Jacobian penalty
            `||dF/dz||_F^2 / d` at the last S-JFB iterate (one Hutchinson vector, Bai et al. 2021).
        fp_jacobian_reg_prob (`float`, defaults to 1.0): fraction of training forwards that pay for it.
        fp_residual_reg (`float`, defaults to 1.0): training only: weight of a relative-residual penalty
            `||z_n - z_{n-1}|| / ||z_{n-1}||` where `fp_residual_reg_iters` says. 0 gives the paper's objective.
        fp_residual_reg_iters (`int`, defaults to 12): where the residual is measured. 0: at the last S-JFB graph
            iteration, which rewards a map whose first application is already its fixed point: the cheapest such map
            is a shared block that does nothing, and at weight 1 the block's update shrinks to a few percent of its
            input and the iterations stop mattering (docs/depth). k > 0: after k more iterations without a graph,
            on one more with a graph, at a depth sampling rarely reaches: a contraction that does its work in its
            first iterations has converged there and pays nothing, while a limit cycle (which the unpenalised map
            falls into on lightly masked canvases) still pays.
        fp_residual_reg_tol (`float`, defaults to 2e-3): hinge of the residual penalty, `weight * max(0, r - tol)`:
            nothing is asked of a map already converged to `tol`.
        fp_residual_reg_prob (`float`, defaults to 0.5): fraction of training forwards that pay for the residual
            penalty (k no-grad iterations and one graph iteration each).
            Both penalties come back as `fixed_point_loss` on the output and the objectives add it.
        fp_train_nograd_iters (`(int, int)`, defaults to (0, 4)): S-JFB no-grad iterations ~ U{lo..hi}.
        fp_train_grad_iters (`(int, int)`, defaults to (3, 6)): S-JFB graph iterations ~ U{lo..hi}.
        anderson_memory (`int`, defaults to 5), anderson_beta (`float`, defaults to 1.0),
            anderson_lam (`float`, defaults to 1e-4): Anderson history size, mixing and ridge term.
        position_encoding (`str`, defaults to `"rope_1d"`): `"rope_1d"` (text) or `"rope_2d"` (images:
            half the rotary dims follow the row, half the column of `grid_size`).
        grid_size (`(int, int)` or None): token grid (rows, cols), required by `"rope_2d"`.

    Example:

    ```python
    >>> from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration
    >>> config = FPMGMConfig(vocab_size=100, mask_token_id=99, hidden_size=32, num_attention_heads=4, cond_dim=16)
    >>> model = FPMGMForMaskedGeneration(config)
    ```
    """

    model_type = "fpmgm"

    def __init__(
        self,
        vocab_size=50258,
        mask_token_id=50257,
        hidden_size=768,
        num_attention_heads=12,
        mlp_ratio=4,
        cond_dim=128,
        max_position_embeddings=1024,
        dropout=0.1,
        time_conditioning=False,
        num_classes=0,
        tie_word_embeddings=False,
        num_pre_layers=1,
        num_fp_layers=1,
        num_post_layers=1,
        injection="constrained",
        fp_decay_init=0.5,
        fp_state_norm=False,
        fp_solver="picard",
        fp_max_iter=8,
        fp_tol=None,
        fp_divergence_patience=5,
        fp_jacobian_reg=0.0,
        fp_jacobian_reg_prob=1.0,
        fp_residual_reg=1.0,
        fp_residual_reg_iters=12,
        fp_residual_reg_tol=2e-3,
        fp_residual_reg_prob=0.5,
        fp_train_nograd_iters=(0, 4),
        fp_train_grad_iters=(3, 6),
        anderson_memory=5,
        anderson_beta=1.0,
        anderson_lam=1e-4,
        position_encoding="rope_1d",
        grid_size=None,
        initializer_range=0.02,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.cond_dim = cond_dim
        self.max_position_embeddings = max_position_embeddings
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.num_classes = num_classes
        self.tie_word_embeddings = tie_word_embeddings
        self.num_pre_layers = num_pre_layers
        self.num_fp_layers = num_fp_layers
        self.num_post_layers = num_post_layers
        self.injection = injection
        self.fp_decay_init = fp_decay_init
        self.fp_state_norm = fp_state_norm
        self.fp_solver = fp_solver
        self.fp_max_iter = fp_max_iter
        self.fp_tol = fp_tol
        self.fp_divergence_patience = fp_divergence_patience
        self.fp_jacobian_reg = fp_jacobian_reg
        self.fp_jacobian_reg_prob = fp_jacobian_reg_prob
        self.fp_residual_reg = fp_residual_reg
        self.fp_residual_reg_iters = fp_residual_reg_iters
        self.fp_residual_reg_tol = fp_residual_reg_tol
        self.fp_residual_reg_prob = fp_residual_reg_prob
        self.fp_train_nograd_iters = fp_train_nograd_iters
        self.fp_train_grad_iters = fp_train_grad_iters
        self.anderson_memory = anderson_memory
        self.anderson_beta = anderson_beta
        self.anderson_lam = anderson_lam
        self.position_encoding = position_encoding
        self.grid_size = grid_size
        self.initializer_range = initializer_range
        self._validate()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _validate(self):
        _check_int("vocab_size", self.vocab_size, 2, LIMITS["vocab_size"])
        if isinstance(self.mask_token_id, bool) or not (
            isinstance(self.mask_token_id, int) and 0 <= self.mask_token_id < self.vocab_size
        ):
            _fail("mask_token_id", self.mask_token_id, f"an integer >= 0 and < vocab_size={self.vocab_size}")
        _check_int("hidden_size", self.hidden_size, 1, LIMITS["hidden_size"])
        _check_int("num_attention_heads", self.num_attention_heads, 1, LIMITS["num_attention_heads"])
        if self.hidden_size % self.num_attention_heads:
            _fail("num_attention_heads", self.num_attention_heads, f"a divisor of hidden_size={self.hidden_size}")
        head_dim = self.hidden_size // self.num_attention_heads
        rotary_axes = 2 if self.position_encoding == "rope_2d" else 1
        if head_dim % (2 * rotary_axes):
            _fail(
                "num_attention_heads",
                self.num_attention_heads,
                f"a value giving a head dim divisible by {2 * rotary_axes} (rotary), got head dim {head_dim}",
            )
        _check_int("mlp_ratio", self.mlp_ratio, 1, LIMITS["mlp_ratio"])
        _check_int("cond_dim", self.cond_dim, 1, LIMITS["cond_dim"])
        _check_int("max_position_embeddings", self.max_position_embeddings, 1, LIMITS["max_position_embeddings"])
        _check_float("dropout", self.dropout, 0, 1, high_open=True)
        for name in ("time_conditioning", "tie_word_embeddings", "fp_state_norm"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        _check_int("num_classes", self.num_classes, 0, LIMITS["num_classes"])
        for name in ("num_pre_layers", "num_fp_layers", "num_post_layers"):
            _check_int(name, getattr(self, name), 0, LIMITS[name])
        if self.num_layers_total == 0:
            _fail("num_pre_layers", self.num_pre_layers, "layer counts with at least one block in total")
        if self.injection not in INJECTIONS:
            _fail("injection", self.injection, list(INJECTIONS))
        _check_float("fp_decay_init", self.fp_decay_init, 0, 1, low_open=True, high_open=True)
        if self.fp_divergence_patience is not None:
            _check_int("fp_divergence_patience", self.fp_divergence_patience, 1, LIMITS["fp_divergence_patience"])
        _check_float("fp_jacobian_reg", self.fp_jacobian_reg, 0, math.inf, high_open=True)
        _check_float("fp_jacobian_reg_prob", self.fp_jacobian_reg_prob, 0, 1, low_open=True)
        _check_float("fp_residual_reg", self.fp_residual_reg, 0, math.inf, high_open=True)
        _check_int("fp_residual_reg_iters", self.fp_residual_reg_iters, 0, 1000)
        _check_float("fp_residual_reg_tol", self.fp_residual_reg_tol, 0, math.inf, high_open=True)
        _check_float("fp_residual_reg_prob", self.fp_residual_reg_prob, 0, 1, low_open=True)
        if self.fp_solver not in SOLVERS:
            _fail("fp_solver", self.fp_solver, list(SOLVERS))
        _check_int("fp_max_iter", self.fp_max_iter, 1, LIMITS["fp_max_iter"])
        if self.fp_tol is not None:
            _check_float("fp_tol", self.fp_tol, 0, math.inf, low_open=True, high_open=True)
        self.fp_train_nograd_iters = _check_range("fp_train_nograd_iters", self.fp_train_nograd_iters, 0)
        self.fp_train_grad_iters = _check_range("fp_train_grad_iters", self.fp_train_grad_iters, 1)
        for name in ("fp_train_nograd_iters", "fp_train_grad_iters"):
            if getattr(self, name)[1] > LIMITS["fp_train_iters"]:
                _fail(name, getattr(self, name), f"a pair (lo, hi) with hi <= {LIMITS['fp_train_iters']}")
        _check_int("anderson_memory", self.anderson_memory, 1, LIMITS["anderson_memory"])
        _check_float("anderson_beta", self.anderson_beta, 0, 1, low_open=True)
        _check_float("anderson_lam", self.anderson_lam, 0, math.inf, high_open=True)
        if self.position_encoding not in POSITION_ENCODINGS:
            _fail("position_encoding", self.position_encoding, list(POSITION_ENCODINGS))
        self._validate_grid()
        if self.estimated_parameters > MAX_PARAMETERS:
            _fail("hidden_size", self.hidden_size, f"sizes giving at most {MAX_PARAMETERS:.3g} parameters (these "
                  f"give about {self.estimated_parameters:.3g}: vocab_size, hidden_size and the layer counts)")
        _check_float("initializer_range", self.initializer_range, 0, math.inf, low_open=True, high_open=True)

    def _validate_grid(self):
        if self.grid_size is None:
            if self.position_encoding == "rope_2d":
                _fail("grid_size", None, "a pair (rows, cols) of positive integers when position_encoding='rope_2d'")
            return
        grid = self.grid_size
        if (
            not isinstance(grid, (list, tuple))
            or len(grid) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in grid)
        ):
            _fail("grid_size", grid, "None or a pair (rows, cols) of positive integers")
        rows, cols = self.grid_size = (int(grid[0]), int(grid[1]))
        if rows * cols > self.max_position_embeddings:
            _fail("grid_size", self.grid_size, f"rows*cols <= max_position_embeddings={self.max_position_embeddings}")

    @property
    def num_layers_total(self) -> int:
        """Distinct blocks: `num_pre_layers + num_fp_layers + num_post_layers`."""
        return self.num_pre_layers + self.num_fp_layers + self.num_post_layers

    @property
    def estimated_parameters(self) -> int:
        """About how many parameters these sizes give (blocks, embeddings, head), without building anything."""
        D, C = self.hidden_size, self.cond_dim
        distinct = self.num_pre_layers + self.num_fp_layers + self.num_post_layers
        block = (4 + 2 * self.mlp_ratio) * D * D + 6 * D * C + (self.mlp_ratio + 9) * D  # weights, adaLN, biases
        conditioning = 256 * C + C * C + (self.num_classes + 1) * C * bool(self.num_classes) + 2 * D * C
        injection = (D * D + 2 * D) * bool(self.num_fp_layers)
        return distinct * block + 2 * self.vocab_size * D + conditioning + injection

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def block_passes(self, fp_iterations: int) -> int:
        """Transformer-block evaluations of one denoiser call: K_pre + n * K_fp + K_post."""
        return self.num_pre_layers + fp_iterations * self.num_fp_layers + self.num_post_layers
