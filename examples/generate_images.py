"""Class-conditional image grid from a trained FP-MaskGIT / MaskGIT model and its VQ tokenizer.

    .venv/bin/python examples/generate_images.py                       # defaults below
    .venv/bin/python examples/generate_images.py --model outputs/images/fp_maskgit_4_1_4/final \
        --rows 4 --guidance 4.0 --budget 96 --out docs/images/example_grid.png

The model folder is an `image_train` export (`final/`, with the VQ tokenizer in `final/vq`). Each column is
one class (0..9), each row a different sample (`num_return_sequences`); sampling uses classifier-free guidance
against the null class, the Halton reveal order, three-state reuse (3SR) of the fixed-point state, and a compute
budget in transformer-block passes per sample. It runs through the image pipeline the folder ships
(`FPMGMImagePipeline`, also `pipeline("image-generation", model=..., trust_remote_code=True)`); the PNG is
written with zlib/struct only (no Pillow needed).
"""

from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "outputs/images/fp_maskgit_4_1_4/final"


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 grayscale `(H, W)` array as an 8-bit PNG."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise ValueError(f"expected a grayscale (H, W) array, got shape {image.shape}.")
    h, w = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def tile(images: np.ndarray, cols: int, pad: int = 2, scale: int = 2) -> np.ndarray:
    """uint8 `(N, H, W)` -> one grid image, row-major, `pad` black pixels between tiles, upscaled `scale`x."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, 0]
    n, h, w = images.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return np.kron(grid, np.ones((scale, scale), dtype=np.uint8)) if scale > 1 else grid


def save_grid(path, images: np.ndarray, cols: int = 10, pad: int = 2, scale: int = 2) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(tile(images, cols, pad, scale)))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="Exported image model folder (with vq/).")
    p.add_argument("--vq", default=None, help="VQ folder (default: MODEL/vq).")
    p.add_argument("--rows", type=int, default=4, help="Samples per class.")
    p.add_argument("--guidance", type=float, default=4.0, help="Classifier-free guidance scale (the protocol's 4).")
    p.add_argument("--budget", type=int, default=96, help="Transformer-block passes per sample.")
    p.add_argument("--randomness", type=float, default=1.0, help="Annealed Gumbel noise on confidences.")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/images/example_grid.png")
    args = p.parse_args(argv)

    import torch

    from fpmgm_hf import FPMGMImagePipeline

    torch.set_num_threads(1)
    if not Path(args.model).is_dir():
        raise SystemExit(f"{args.model!r} not found: train one first, e.g. `python -m fpmgm_hf.images.train "
                         f"--data mnist --max-steps 300 --out outputs/images/fp_maskgit_4_1_4`.")
    pipe = FPMGMImagePipeline.from_pretrained(args.model, vqvae=args.vq)
    k = pipe.model.config.num_classes
    try:
        out = pipe(list(range(k)), num_return_sequences=args.rows, guidance_scale=args.guidance,
                   sampler="confidence", order="halton", reuse="3sr", budget=args.budget,
                   randomness=args.randomness, temperature=args.temperature,
                   generator=torch.Generator().manual_seed(args.seed), output_type="np")
    except FloatingPointError as err:  # a briefly trained FP block need not be contractive
        raise SystemExit(f"the fixed-point iterates diverged ({str(err)[:80]}...); try a smaller --budget "
                         "(fewer iterations per step) or a longer-trained model.") from None
    # num_return_sequences keeps each class's samples adjacent: reorder to one column per class
    images = out.images[..., 0].reshape(k, args.rows, *out.images.shape[1:3]).transpose(1, 0, 2, 3)
    save_grid(args.out, images.reshape(-1, *images.shape[2:]), cols=k)
    print(f"wrote {args.out}: {args.rows} x {k} samples, budget {args.budget}, guidance {args.guidance}")
    return args.out


if __name__ == "__main__":
    main()
