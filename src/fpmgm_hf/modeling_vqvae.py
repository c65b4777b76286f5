"""A small convolutional VQ-VAE image tokenizer (van den Oord et al., 2017) for FP-MaskGIT on 28x28 images.

Quantiser: nearest neighbour in Euclidean distance, straight-through gradient to the encoder, codebook
updated by exponential moving averages of the assigned encoder outputs (no codebook loss; the loss is
`recon_loss + commitment_cost * commitment_loss`). Codes left unused can be restarted by the training loop with
[`VQVAEQuantizer.restart_codes`].

Hub-portable: imports only torch, transformers, the standard library and sibling files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_vqvae import VQVAEConfig
from .validation_fpmgm import CheckedWeightsMixin

Tensor = torch.Tensor


@dataclass
class VQVAEOutput(ModelOutput):
    """Output of [`VQVAEModel.forward`].

    reconstruction (`(B, C, H, W)` float in [0, 1]): decoded images (decoder output clamped to [0, 1]).
    loss (`()`): `recon_loss + commitment_cost * commitment_loss`.
    recon_loss (`()`): mean squared error between the unclamped decoder output and the input (pixels in [0, 1];
        a linear output with MSE, as a sigmoid output saturates on the mostly-black digits).
    commitment_loss (`()`): mean squared distance between encoder outputs and their (detached) codes.
    codes (`LongTensor (B, rows*cols)`): token ids in [0, codebook_size).
    perplexity (`()`): exp(entropy) of the batch's code histogram (1 = one code used, K = uniform use).
    """

    reconstruction: Optional[Tensor] = None
    loss: Optional[Tensor] = None
    recon_loss: Optional[Tensor] = None
    commitment_loss: Optional[Tensor] = None
    codes: Optional[Tensor] = None
    perplexity: Optional[Tensor] = None


class VQVAEResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class VQVAEEncoder(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        h = config.hidden_channels
        self.conv_in = nn.Conv2d(config.in_channels, h, 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(h, h, 4, stride=2, padding=1) for _ in range(config.downsample))
        self.res = nn.ModuleList(VQVAEResBlock(h) for _ in range(config.num_res_blocks))
        self.conv_out = nn.Conv2d(h, config.code_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for down in self.down:
            x = down(F.relu(x))
        for block in self.res:
            x = block(x)
        return self.conv_out(F.relu(x))


class VQVAEDecoder(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        h = config.hidden_channels
        self.conv_in = nn.Conv2d(config.code_dim, h, 3, padding=1)
        self.res = nn.ModuleList(VQVAEResBlock(h) for _ in range(config.num_res_blocks))
        self.up = nn.ModuleList(nn.ConvTranspose2d(h, h, 4, stride=2, padding=1) for _ in range(config.downsample))
        self.conv_out = nn.Conv2d(h, config.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        for block in self.res:
            x = block(x)
        for up in self.up:
            x = up(F.relu(x))
        return self.conv_out(F.relu(x))  # pixels, unclamped (trained with MSE against [0, 1] targets)


class VQVAEQuantizer(nn.Module):
    """Nearest-neighbour quantiser with an EMA-updated codebook (all state in persistent buffers).

    In training mode each forward moves `ema_cluster_size` / `ema_embed_sum` towards the batch's code counts
    and summed assigned vectors, then sets `codebook = ema_embed_sum / smoothed(ema_cluster_size)`.
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.decay = config.ema_decay
        self.epsilon = config.ema_epsilon
        k, d = config.codebook_size, config.code_dim
        self.register_buffer("codebook", torch.empty(k, d))
        self.register_buffer("ema_cluster_size", torch.empty(k))
        self.register_buffer("ema_embed_sum", torch.empty(k, d))

    def nearest(self, flat: Tensor) -> Tensor:
        """Code ids `(N,)` nearest to the rows of `flat (N, D)`."""
        code = self.codebook.to(flat.dtype)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ code.t() + code.pow(2).sum(1)[None]
        return dist.argmin(1)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, ids: Tensor) -> None:
        onehot = F.one_hot(ids, self.codebook.shape[0]).to(flat.dtype)
        self.ema_cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        n = self.ema_cluster_size.sum()
        k = self.codebook.shape[0]
        size = (self.ema_cluster_size + self.epsilon) / (n + k * self.epsilon) * n
        self.codebook.copy_(self.ema_embed_sum / size[:, None])

    @torch.no_grad()
    def init_from(self, latents: Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Set the codebook to randomly chosen encoder outputs `latents (B, D, h, w)` (data-dependent init)."""
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
        k = self.codebook.shape[0]
        idx = torch.randint(0, flat.shape[0], (k,), generator=generator).to(flat.device)
        self.codebook.copy_(flat[idx])
        self.ema_embed_sum.copy_(flat[idx])
        self.ema_cluster_size.fill_(1.0)

    @torch.no_grad()
    def restart_codes(self, codes: Tensor, latents: Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Move the codes `codes (M,)` onto random encoder outputs taken from `latents (B, D, h, w)`."""
        if codes.numel() == 0:
            return
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
        idx = torch.randint(0, flat.shape[0], (codes.numel(),), generator=generator).to(flat.device)
        codes = codes.to(self.codebook.device)
        self.codebook[codes] = flat[idx]
        self.ema_embed_sum[codes] = flat[idx]
        self.ema_cluster_size[codes] = 1.0

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`z (B, D, h, w)` -> (straight-through quantised z, ids (B, h*w), commitment loss, perplexity)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        ids = self.nearest(flat.detach())
        if self.training:
            self._ema_update(flat.detach().float(), ids)
        quant = F.embedding(ids, self.codebook).to(z.dtype)
        commitment = F.mse_loss(flat, quant.detach())
        quant = flat + (quant - flat).detach()  # straight-through estimator
        probs = torch.bincount(ids, minlength=self.codebook.shape[0]).float() / ids.numel()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        return quant.view(b, h, w, d).permute(0, 3, 1, 2), ids.view(b, h * w), commitment, perplexity


class VQVAEPreTrainedModel(CheckedWeightsMixin, PreTrainedModel):
    config_class = VQVAEConfig
    base_model_prefix = "vqvae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module):
        # Called per leaf module (custom code): convs get PyTorch's default scheme, the quantiser a small normal
        # codebook (training replaces it with encoder outputs, see `VQVAEQuantizer.init_from`).
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, VQVAEQuantizer):
            init.normal_(module.codebook, std=1.0 / module.codebook.shape[0])
            init.ones_(module.ema_cluster_size)
            init.copy_(module.ema_embed_sum, module.codebook)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Both Auto entries must reach config.json, and the code files must be copied next to the weights.
        if getattr(type(self), "_auto_class", None) is None:
            type(self).register_for_auto_class("AutoModel")
        if getattr(type(self.config), "_auto_class", None) is None:
            type(self.config).register_for_auto_class()
        self.config.auto_map = {
            "AutoConfig": "configuration_vqvae.VQVAEConfig",
            "AutoModel": f"modeling_vqvae.{type(self).__name__}",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


class VQVAEModel(VQVAEPreTrainedModel):
    """Convolutional VQ-VAE: `encode` images to token ids, `decode` ids to images, `forward` for training."""

    def __init__(self, config: VQVAEConfig):
        super().__init__(config)
        self.encoder = VQVAEEncoder(config)
        self.quantizer = VQVAEQuantizer(config)
        self.decoder = VQVAEDecoder(config)
        self.post_init()

    def _prepare_images(self, images, name: str) -> Tensor:
        """uint8 or float-in-[0, 1] images, `(B, H, W)` (single channel) or `(B, C, H, W)` -> float `(B, C, H, W)`."""
        cfg = self.config
        x = torch.as_tensor(images)
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.dim() == 3 and cfg.in_channels == 1:
            x = x.unsqueeze(1)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"`{name}` must have shape (B, {expected[0]}, {expected[1]}, {expected[2]})"
                + (f" or (B, {expected[1]}, {expected[2]})" if cfg.in_channels == 1 else "")
                + f" (image size {cfg.image_size}x{cfg.image_size}); got shape {tuple(torch.as_tensor(images).shape)}."
            )
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.is_floating_point():
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise ValueError(f"`{name}` floats must lie in [0, 1]; got range [{x.min():.4g}, {x.max():.4g}].")
        else:
            raise ValueError(f"`{name}` must be uint8 or floating point in [0, 1]; got dtype {x.dtype}.")
        return x.to(device=self.device, dtype=self.dtype)

    def encode_latents(self, images) -> Tensor:
        """Continuous encoder output `(B, code_dim, rows, cols)` (before quantisation)."""
        return self.encoder(self._prepare_images(images, "images") * 2 - 1)

    @torch.no_grad()
    def encode(self, images) -> Tensor:
        """Token ids `LongTensor (B, rows*cols)` in [0, codebook_size), row-major over the token grid."""
        z = self.encode_latents(images)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return self.quantizer.nearest(flat).view(z.shape[0], -1)

    def _check_ids(self, ids) -> Tensor:
        ids = torch.as_tensor(ids)
        rows, cols = self.config.grid_size
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"`ids` must be an integer tensor; got dtype {ids.dtype}.")
        if ids.dim() == 3 and tuple(ids.shape[1:]) == (rows, cols):
            ids = ids.reshape(ids.shape[0], -1)
        if ids.dim() != 2 or ids.shape[1] != rows * cols:
            raise ValueError(
                f"`ids` must have shape (B, {rows * cols}) or (B, {rows}, {cols}); got {tuple(ids.shape)}."
            )
        k = self.config.codebook_size
        if ids.numel() and (ids.min() < 0 or ids.max() >= k):
            raise ValueError(f"`ids` must lie in [0, {k}) (codebook_size={k}); got range [{ids.min()}, {ids.max()}].")
        return ids.long().to(self.device)

    def decode_raw(self, ids) -> Tensor:
        """Unclamped decoder output `(B, C, H, W)` for token ids (differentiable w.r.t. the decoder)."""
        ids = self._check_ids(ids)
        rows, cols = self.config.grid_size
        quant = F.embedding(ids, self.quantizer.codebook).to(self.dtype)  # (B, L, D)
        quant = quant.view(ids.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
        return self.decoder(quant)

    @torch.no_grad()
    def decode(self, ids) -> Tensor:
        """Images float in [0, 1], `(B, C, H, W)`, from ids `(B, rows*cols)` or `(B, rows, cols)`."""
        return self.decode_raw(ids).clamp(0, 1)

    def forward(self, pixel_values, return_dict: Optional[bool] = None, **kwargs) -> VQVAEOutput:
        r"""
        Args:
            pixel_values (`(B, C, H, W)` or `(B, H, W)`, uint8 or float in [0, 1]): images to reconstruct.
        """
        x = self._prepare_images(pixel_values, "pixel_values")
        z = self.encoder(x * 2 - 1)
        quant, codes, commitment, perplexity = self.quantizer(z)
        raw = self.decoder(quant)
        recon_loss = F.mse_loss(raw, x)
        loss = recon_loss + self.config.commitment_cost * commitment
        return VQVAEOutput(
            reconstruction=raw.clamp(0, 1),
            loss=loss,
            recon_loss=recon_loss,
            commitment_loss=commitment,
            codes=codes,
            perplexity=perplexity,
        )


__all__ = ["VQVAEModel", "VQVAEOutput", "VQVAEPreTrainedModel", "VQVAEQuantizer"]
