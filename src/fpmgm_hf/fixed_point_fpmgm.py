"""The pieces of the fixed-point map around the shared block: the input injection, warm starts and their
safety check, and the training-time regularisers of the map (arXiv 2605.31215 §3.1; docs/stability).

Hub-portable: imports only torch, transformers, the standard library and sibling files.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import initialization as init

Tensor = torch.Tensor

WARM_START_MAX_RATIO = 100.0  # a warm start whose norm exceeds this multiple of h_pre's is rejected


class WarmStart(NamedTuple):
    """A three-state-reuse initialisation: `z0 = gamma * state + (1 - gamma) * h_pre`.

    state (`Tensor (B, L, D)`): the previous step's fixed point `h*`.
    gamma (`Tensor (B, L)`): per-token weight of `state` (1 = full reuse, 0 = start from `h_pre`).
    """

    state: Tensor
    gamma: Tensor


class FPMGMInjection(nn.Module):
    """Input injection: how the shared block sees `h_pre`. `F(z) = block(injection(z, G(h_pre)))`.

    `constrained` (default): `A * z + (1 - A) * G(h_pre)`, `A = exp(-exp(a))` per channel, so the linear part
    is a contraction by construction (in the spirit of Parcae's constrained injection); the pre-LN block then
    only adds a bounded amount, so the state cannot grow geometrically. G is a Linear initialised to the
    identity: from `z0 = h_pre` the first iteration is exactly `block(h_pre)`. Elementwise per iteration.
    `concat_mlp` (the paper's / FPDM's): G = Linear(D, D) on h_pre, then fc2(GELU(fc1(concat(z, G(h_pre))))),
    2D -> 2D -> D, initialised to the identity in z: fc1 = [[I, 0], [-I, 0]] and fc2 = [I, -I], because
    GELU(x) - GELU(-x) = x exactly (tanh form too), with small random weights on the G columns. It is
    homogeneous in z, so whatever gain it learns multiplies the state at every iteration.
    `add`: z + G(h_pre), G initialised small. `none`: z.
    """

    def __init__(self, config):
        super().__init__()
        D, self.kind = config.hidden_size, config.injection
        self.std = config.initializer_range
        self.decay_init = config.fp_decay_init
        if self.kind != "none":
            self.proj = nn.Linear(D, D)
            self.proj._fpmgm_role = "identity" if self.kind == "constrained" else "proj"
        if self.kind == "constrained":
            self.decay_log = nn.Parameter(torch.empty(D))  # a, with A = exp(-exp(a))
        if self.kind == "concat_mlp":
            self.fc1 = nn.Linear(2 * D, 2 * D)
            self.act = nn.GELU(approximate="tanh")
            self.fc2 = nn.Linear(2 * D, D)
            self.fc1._fpmgm_role, self.fc2._fpmgm_role = "fc1", "fc2"

    def decay(self) -> Tensor:
        """`A = exp(-exp(a))` of the constrained injection, shape (D,), in (0, 1)."""
        return torch.exp(-torch.exp(self.decay_log.float())).to(self.decay_log.dtype)

    def prepare(self, h_pre: Tensor) -> Optional[Tensor]:
        """The part of the injection that does not depend on z, computed once per forward: `(1 - A) G(h_pre)`
        for `constrained`, G(h_pre) for `add`, and fc1's G-columns applied to G(h_pre) plus fc1's bias for
        `concat_mlp` (exact: fc1 is linear in the concatenation), which leaves 2D x D + D x 2D multiply-adds
        per token and iteration."""
        if self.kind == "none":
            return None
        if self.kind == "constrained":  # (1 - A) folded into G's rows: one Linear, no extra pass over (B, L, D)
            scale = 1 - self.decay()  # (D,)
            return F.linear(h_pre, self.proj.weight * scale[:, None], self.proj.bias * scale)
        injected = self.proj(h_pre)  # (B, L, D)
        if self.kind == "add":
            return injected
        D = injected.shape[-1]
        return F.linear(injected, self.fc1.weight[:, D:], self.fc1.bias)  # (B, L, 2D)

    def forward(self, z: Tensor, injected: Optional[Tensor]) -> Tensor:
        """z: (B, L, D); injected: the output of `prepare` (for the same rows)."""
        if self.kind == "none":
            return z
        if self.kind == "constrained":
            return torch.addcmul(injected, z, self.decay())
        if self.kind == "add":
            return z + injected
        D = z.shape[-1]
        return self.fc2(self.act(F.linear(z, self.fc1.weight[:, :D]) + injected))

    @torch.no_grad()
    def reset_identity(self):
        """The close-to-identity initialisation (also used by the MDLM converter); exact for `constrained`."""
        for linear in (getattr(self, name, None) for name in ("proj", "fc1", "fc2")):
            if linear is not None:
                init_injection_linear(linear, self.std)
        if self.kind == "constrained":
            init_decay_log(self.decay_log, self.decay_init)


def init_decay_log(param: Tensor, decay: float) -> None:
    """Set `a` so that `A = exp(-exp(a))` equals `decay` in every channel."""
    init.constant_(param, math.log(-math.log(decay)))


def init_injection_linear(linear: nn.Linear, std: float):
    """Initialise one injection Linear by its role (set in FPMGMInjection.__init__). Done per Linear because
    transformers only calls `_init_weights` on modules that own parameters directly."""
    role = getattr(linear, "_fpmgm_role", None)
    init.zeros_(linear.bias)
    if role == "proj":
        init.normal_(linear.weight, std=std)
        return
    if role == "identity":
        init.copy_(
            linear.weight, torch.eye(linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
        )
        return
    D = linear.out_features if role == "fc2" else linear.in_features // 2
    eye = torch.eye(D, device=linear.weight.device, dtype=linear.weight.dtype)
    if role == "fc2":
        init.copy_(linear.weight, torch.cat([eye, -eye], dim=1))
        return
    weight = torch.zeros_like(linear.weight)
    weight[:D, :D], weight[D:, :D] = eye, -eye
    weight[:, D:] = torch.randn_like(weight[:, D:]) * std
    init.copy_(linear.weight, weight)


def differentiable_residual(z: Tensor, z_prev: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    """Mean over the batch of `||z - z_prev|| / ||z_prev||` with a graph (z, z_prev: (B, L, D)). A floor of 1e-4
    under the ratio keeps the square root differentiable at an exact fixed point (the map of a fresh model
    with zero-initialised gates is the identity there)."""
    diff, ref = (z - z_prev).float().pow(2).sum(-1), z_prev.float().pow(2).sum(-1)  # (B, L)
    if token_mask is not None:
        diff, ref = diff * token_mask, ref * token_mask
    ratio = diff.sum(1) / ref.sum(1).clamp_min(1e-12)
    return (ratio + 1e-8).sqrt().mean()


def jacobian_frobenius(f, z: Tensor, token_mask: Optional[Tensor], generator) -> Tensor:
    """Hutchinson estimate of `||df/dz||_F^2 / d` at `z` (B, L, D) with one Gaussian probe from `generator`:
    `E||v^T J||^2 = ||J||_F^2`. The state is cut from the graph; the estimate is differentiable in the weights
    (one extra map evaluation, in the math attention kernel, and a double backward)."""
    z = z.detach().requires_grad_(True)
    gen_device = generator.device if generator is not None else "cpu"
    v = torch.randn(z.shape, generator=generator, device=gen_device).to(device=z.device, dtype=z.dtype)
    if token_mask is not None:
        v = v * token_mask[..., None]
    # The fused SDPA kernels have no double backward; the math kernel is plain differentiable ops.
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        (vjp,) = torch.autograd.grad(f(z, None), z, v, create_graph=True)
    count = z.shape[-1] * (z.shape[0] * z.shape[1] if token_mask is None else token_mask.sum().clamp_min(1))
    return vjp.float().pow(2).sum() / count
