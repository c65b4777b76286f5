"""The layers of FP-MGM: MDLM's DiT block (fp32 LayerNorm, adaLN, rotary attention), the timestep / class
conditioning and the final layer. Attention dispatches on `config._attn_implementation`: "sdpa" (default, torch's
fused kernel), "eager" (explicit softmax; the only one that returns attention weights) or any function registered
with transformers' `AttentionInterface`.

Hub-portable: imports only torch, transformers, the standard library and sibling files.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_fpmgm import FPMGMConfig

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------- layers


class FPMGMLayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (as MDLM)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.float(), [self.dim]) * self.weight.float()
        return y.to(x.dtype)


class ZeroInitLinear(nn.Linear):
    """A Linear initialised to zero (adaLN modulations and the output head, as MDLM)."""


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x: (B, L, D); shift, scale: (B, 1, D)."""
    return x * (1 + scale) + shift


def rotary_tables(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables for non-interleaved rotary embeddings.

    positions (`(L, P)`): P position axes (1 for text, 2 for image grids); the head dim is split into P
    equal chunks, one per axis. Returns cos, sin of shape `(L, head_dim)` in float32.
    """
    L, P = positions.shape
    chunk = head_dim // P
    inv_freq = 1.0 / base ** (torch.arange(0, chunk, 2, device=positions.device, dtype=torch.float32) / chunk)
    tables = []
    for axis in range(P):
        freqs = positions[:, axis, None].float() * inv_freq  # (L, chunk/2)
        tables.append(torch.cat([freqs, freqs], dim=-1))  # (L, chunk)
    angles = torch.cat(tables, dim=-1)  # (L, head_dim)
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, axes: int = 1) -> Tensor:
    """Rotate x `(B, H, L, hd)` with tables `(L, hd)`; each of the `axes` chunks of hd rotates on its own."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if axes == 1:
        return x * cos + _rotate_half(x) * sin
    parts = [_rotate_half(p) for p in x.chunk(axes, dim=-1)]
    return x * cos + torch.cat(parts, dim=-1) * sin


def eager_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                            scaling: float, dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """Attention written out: softmax(q k^T * scaling + mask) v, the softmax in float32.

    query / key / value: (B, H, L, hd); attention_mask: (B, 1, 1 | L, L), bool (True = attend) or additive.
    Returns the output (B, L, H, hd) and the weights (B, H, L, L), as transformers' attention functions do."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, L, L)
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class FPMGMAttention(nn.Module):
    """Bidirectional multi-head attention with packed qkv (no bias) and rotary q/k. The kernel follows
    `config._attn_implementation` at every call (so `set_attn_implementation` takes effect): "sdpa" calls torch's
    `scaled_dot_product_attention`, "eager" `eager_attention_forward`, any other name the function registered
    under it in transformers' `AttentionInterface`."""

    is_causal = False

    def __init__(self, config: FPMGMConfig):
        super().__init__()
        self.config = config
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.rotary_axes = 2 if config.position_encoding == "rope_2d" else 1
        self.attn_qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.attn_out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], attn_mask: Optional[Tensor],
                attn_sink: Optional[list] = None) -> Tensor:
        """x: (B, L, D); attn_mask: (B, 1, 1, L) bool keys or None. With `attn_sink` (a list) the eager kernel runs
        and the weights (B, H, L, L) are appended to it."""
        B, L, D = x.shape
        qkv = self.attn_qkv(x).view(B, L, 3, self.num_heads, self.head_dim)  # packed [q | k | v]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, hd)
        q = apply_rotary(q, *rope, axes=self.rotary_axes)
        k = apply_rotary(k, *rope, axes=self.rotary_axes)
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if impl == "sdpa" and attn_sink is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)  # (B, L, H, hd)
        else:
            kernel = eager_attention_forward if attn_sink is not None else ALL_ATTENTION_FUNCTIONS.get_interface(
                impl, eager_attention_forward)
            out, weights = kernel(self, q, k, v, attn_mask, scaling=self.scaling, dropout=0.0, is_causal=False)
            if attn_sink is not None:
                attn_sink.append(weights)
        return self.attn_out(out.reshape(B, L, D))


class FPMGMBlock(GradientCheckpointingLayer):
    """A DiT block laid out as MDLM's DDiTBlock: pre-LN, adaLN shift/scale/gate, gated residuals."""

    def __init__(self, config: FPMGMConfig):
        super().__init__()
        D = config.hidden_size
        self.norm1 = FPMGMLayerNorm(D)
        self.attn = FPMGMAttention(config)
        self.norm2 = FPMGMLayerNorm(D)
        self.mlp = nn.Sequential(
            nn.Linear(D, config.mlp_ratio * D), nn.GELU(approximate="tanh"), nn.Linear(config.mlp_ratio * D, D)
        )
        self.adaLN_modulation = ZeroInitLinear(config.cond_dim, 6 * D)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor], attn_mask: Optional[Tensor],
                attn_sink: Optional[list] = None) -> Tensor:
        """x: (B, L, D); c: (B, cond_dim); attn_mask: (B, 1, 1, L) bool or None; `attn_sink`: see FPMGMAttention."""
        mod = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)  # 6 x (B, 1, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, attn_mask, attn_sink)
        x = x + gate_msa * self.dropout(h)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * self.dropout(h)


class FPMGMTimestepEmbedder(nn.Module):
    """Sinusoidal features [cos | sin] of width 256, then Linear -> SiLU -> Linear (MDLM's sigma_map)."""

    frequency_size = 256

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.frequency_size, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class FPMGMConditioning(nn.Module):
    """c = SiLU(sigma_map(t) + class_embed(y)) of shape (B, cond_dim). Without time conditioning t = 0
    (MDLM-OWT); with `num_classes > 0`, class id `num_classes` is the null class (classifier-free guidance)."""

    def __init__(self, config: FPMGMConfig):
        super().__init__()
        self.time_conditioning, self.num_classes = config.time_conditioning, config.num_classes
        self.sigma_map = FPMGMTimestepEmbedder(config.cond_dim)
        self.class_embed = nn.Embedding(config.num_classes + 1, config.cond_dim) if config.num_classes else None

    def forward(self, batch: int, device, timesteps: Optional[Tensor], class_labels: Optional[Tensor]) -> Tensor:
        if self.time_conditioning:
            if timesteps is None:
                raise ValueError("`timesteps` is required because config.time_conditioning=True.")
            t = timesteps.to(device).float().expand(batch) if timesteps.dim() == 0 else timesteps.to(device)
        else:
            t = torch.zeros(batch, device=device)
        c = self.sigma_map(t)
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.num_classes, device=device, dtype=torch.long)
            c = c + self.class_embed(class_labels)
        return F.silu(c)


class FPMGMFinalLayer(nn.Module):
    """norm_final -> modulate(shift, scale from c) -> linear with bias (MDLM's DDitFinalLayer)."""

    def __init__(self, config: FPMGMConfig):
        super().__init__()
        D = config.hidden_size
        self.norm_final = FPMGMLayerNorm(D)
        linear_cls = nn.Linear if config.tie_word_embeddings else ZeroInitLinear
        self.linear = linear_cls(D, config.vocab_size)
        self.adaLN_modulation = ZeroInitLinear(config.cond_dim, 2 * D)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x: (B, L, D) with c: (B, cond_dim), or x: (N, D) with one conditioning row per position, c: (N, cond_dim)
        (generation runs the head only where it draws tokens)."""
        mod = self.adaLN_modulation(c)
        if x.dim() == 3:
            mod = mod[:, None]  # (B, 1, 2D): one modulation per sequence
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
