"""Configuration of the small VQ-VAE image tokenizer used by FP-MaskGIT (MNIST / Fashion-MNIST).

Hub-portable: imports only the standard library, transformers and sibling files.
"""

from __future__ import annotations

from functools import partial

from transformers import PretrainedConfig

from .validation_fpmgm import check_float, check_int, fail

# The shared checks, bound to this config's name for the error messages.
_fail = partial(fail, "VQVAEConfig")
_check_int = partial(check_int, "VQVAEConfig")
_check_float = partial(check_float, "VQVAEConfig")


class VQVAEConfig(PretrainedConfig):
    r"""Configuration of [`VQVAEModel`], a convolutional VQ-VAE that turns `image_size`^2 images into a
    `grid_size` grid of discrete tokens in `[0, codebook_size)`.

    Args:
        image_size (`int`, defaults to 28): side of the square input images.
        in_channels (`int`, defaults to 1): image channels.
        hidden_channels (`int`, defaults to 32): width of the conv encoder/decoder.
        num_res_blocks (`int`, defaults to 1): residual blocks per resolution in encoder and decoder.
        downsample (`int`, defaults to 2): number of stride-2 stages; the token grid side is
            `image_size // 2**downsample` (28 -> 7x7 for the default 2, i.e. a factor 4).
        codebook_size (`int`, defaults to 256): number of codes K.
        code_dim (`int`, defaults to 16): dimension of each code vector.
        commitment_cost (`float`, defaults to 0.25): weight beta of `||z_e - sg(e)||^2` in the loss.
        ema_decay (`float`, defaults to 0.99): decay of the exponential moving averages that update the
            codebook (the codebook gets no gradient; see `VQVAEQuantizer`).
        ema_epsilon (`float`, defaults to 1e-5): Laplace smoothing of the EMA cluster sizes.

    Example:

    ```python
    >>> from fpmgm_hf.images.vq import VQVAEConfig, VQVAEModel
    >>> model = VQVAEModel(VQVAEConfig(hidden_channels=32, codebook_size=64))
    >>> model.config.grid_size
    (7, 7)
    ```
    """

    model_type = "fpmgm_vqvae"

    def __init__(
        self,
        image_size=28,
        in_channels=1,
        hidden_channels=32,
        num_res_blocks=1,
        downsample=2,
        codebook_size=256,
        code_dim=16,
        commitment_cost=0.25,
        ema_decay=0.99,
        ema_epsilon=1e-5,
        **kwargs,
    ):
        self.image_size = image_size
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_res_blocks = num_res_blocks
        self.downsample = downsample
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.commitment_cost = commitment_cost
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self._validate()
        super().__init__(**kwargs)

    def _validate(self):
        _check_int("image_size", self.image_size, 1)
        _check_int("in_channels", self.in_channels, 1)
        _check_int("hidden_channels", self.hidden_channels, 1)
        _check_int("num_res_blocks", self.num_res_blocks, 0)
        _check_int("downsample", self.downsample, 0, 8)
        if self.image_size % (2**self.downsample):
            _fail("image_size", self.image_size, f"a multiple of 2**downsample={2**self.downsample}")
        _check_int("codebook_size", self.codebook_size, 2, 65536)  # ids must fit uint16 in the .npz files
        _check_int("code_dim", self.code_dim, 1)
        _check_float("commitment_cost", self.commitment_cost, 0.0, float("inf"), high_open=True)
        _check_float("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        _check_float("ema_epsilon", self.ema_epsilon, 0.0, float("inf"), low_open=True, high_open=True)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid `(rows, cols)` per image."""
        side = self.image_size // (2**self.downsample)
        return (side, side)

    @property
    def num_tokens(self) -> int:
        """Tokens per image, `rows * cols`."""
        rows, cols = self.grid_size
        return rows * cols
