"""VQ-VAE image tokenizer for FP-MaskGIT: Auto registration, training, evaluation and a CLI.

```
python -m fpmgm_hf.images.vq train  --dataset mnist --steps 2000 --out outputs/vq/mnist
python -m fpmgm_hf.images.vq encode --model outputs/vq/mnist --dataset mnist --split train --out codes.npz
python -m fpmgm_hf.images.vq eval   --model outputs/vq/mnist --dataset mnist --split test
```

The `.npz` written by `encode` holds `tokens` (uint16 `(N, rows, cols)`, ids in [0, codebook_size)), `labels`
(int64 `(N,)`), `codebook_size` and `grid_size`: the training data of the image FP-MGM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..configuration_vqvae import VQVAEConfig
from ..modeling_vqvae import VQVAEModel, VQVAEOutput, VQVAEPreTrainedModel, VQVAEQuantizer
from ..validation_fpmgm import write_manifest

DATASETS = ("mnist", "fashion_mnist")
SUMMARY_FILE = "vq_training.json"

__all__ = [
    "VQVAEConfig",
    "VQVAEModel",
    "VQVAEOutput",
    "VQVAEPreTrainedModel",
    "VQVAEQuantizer",
    "encode_dataset",
    "evaluate_reconstruction",
    "train_vqvae",
]


def reconstruction_fid(model: VQVAEModel, images, num_images: int, batch_size: int = 500) -> dict[str, float]:
    """FID between the first `num_images` of `images` (uint8) and their reconstructions, through the TF-FID
    Inception net, with the same-N floor FID(those images vs the next `num_images`): small-N FID is biased
    upwards, so read rFID against the floor."""
    from ..evaluation.metrics import InceptionFeatures, fid_from_features

    images = np.asarray(images)
    if not 2 <= num_images <= len(images) // 2:
        raise ValueError(f"`num_images`={num_images} must be in [2, {len(images) // 2}] (half the split).")
    real = images[:num_images]
    with torch.no_grad():
        recon = torch.cat([model(torch.as_tensor(real[i : i + batch_size])).reconstruction
                           for i in range(0, num_images, batch_size)])
    recon = (recon[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    inception = InceptionFeatures(batch_size=50)
    feats = inception(real)
    return {"rfid": fid_from_features(feats, inception(recon)), "num_images": num_images,
            "floor": fid_from_features(feats, inception(images[num_images : 2 * num_images]))}


def _load_images(dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if dataset not in DATASETS:
        raise ValueError(f"`dataset`={dataset!r} is invalid; allowed: {list(DATASETS)}.")
    from ..data.assets import load_image_dataset

    return load_image_dataset(dataset, split)


def _atomic_save(model: VQVAEModel, out_dir: Path, summary: Optional[dict] = None) -> None:
    """`save_pretrained` into a temporary sibling folder, then swap it in with renames."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should look like any other
        model.save_pretrained(tmp)
        if summary is not None:
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            write_manifest(tmp)  # the manifest covers the summary too
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.no_grad()
def evaluate_reconstruction(model: VQVAEModel, images, batch_size: int = 500) -> dict[str, float]:
    """Tokenize and reconstruct `images` (uint8 or float in [0, 1]); pixel metrics in [0, 1] units.

    Returns `mse` (mean over all pixels), `psnr` = 10 log10(1 / mse) in dB, `psnr_per_image` (mean of
    per-image PSNRs), `perplexity` of the code histogram over all tokens and `codes_used` (distinct ids).
    """
    was_training = model.training
    model.eval()
    images = torch.as_tensor(images)
    if images.shape[0] == 0:
        raise ValueError("`images` is empty.")
    sq_err, per_image_psnr, counts = 0.0, [], torch.zeros(model.config.codebook_size, dtype=torch.long)
    n_pix = 0
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            out = model(batch)
            x = model._prepare_images(batch, "images")
            err = (out.reconstruction.float() - x.float()).pow(2).flatten(1)
            sq_err += err.sum().item()
            n_pix += err.numel()
            per_image_psnr.append(10 * torch.log10(1.0 / err.mean(1).clamp_min(1e-10)))
            counts += torch.bincount(out.codes.flatten().cpu(), minlength=model.config.codebook_size)
    finally:
        model.train(was_training)
    mse = sq_err / n_pix
    probs = counts.double() / counts.sum()
    nz = probs[probs > 0]
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-10)),
        "psnr_per_image": torch.cat(per_image_psnr).mean().item(),
        "perplexity": math.exp(-(nz * nz.log()).sum().item()),
        "codes_used": int((counts > 0).sum()),
    }


def train_vqvae(
    dataset: str = "mnist",
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 2e-3,
    out_dir: Optional[str | os.PathLike] = None,
    seed: int = 0,
    config: Optional[VQVAEConfig] = None,
    num_train: Optional[int] = None,
    restart_every: int = 50,
    dead_code_threshold: int = 1,
    restart_until: float = 0.8,
    eval_images: int = 10000,
    progress: bool = True,
    images: Optional[Any] = None,
) -> tuple[VQVAEModel, dict[str, Any]]:
    """Train a VQ-VAE tokenizer with Adam (`lr`, linear warm-up over 5% of the steps, cosine decay to 0).

    Deterministic for a given `seed`: weights are initialised under `torch.manual_seed(seed)` (restored
    afterwards) and batches, codebook init and dead-code restarts draw from an explicit `torch.Generator`.
    The codebook starts at random encoder outputs of the first batch; every `restart_every` steps during
    the first `restart_until` fraction of training, codes assigned fewer than `dead_code_threshold` times
    over those steps move onto random encoder outputs of the current batch.

    `images` (uint8 `(N, H, W)` / `(N, C, H, W)`) overrides the dataset (used by the tests). Returns the model
    (eval mode) and a summary with the losses and, for the dataset's test split (first `eval_images`
    images; 0 to skip), the metrics of [`evaluate_reconstruction`]. With `out_dir`, the model is saved
    atomically there with `vq_training.json` holding that summary.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("restart_every", restart_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}`={value!r} is invalid; allowed: an integer >= 1.")
    if not lr > 0:
        raise ValueError(f"`lr`={lr!r} is invalid; allowed: a float > 0.")
    if images is None:
        train_images, _ = _load_images(dataset, "train")
    else:
        train_images = images
    train_images = torch.as_tensor(train_images)
    if num_train is not None:
        train_images = train_images[:num_train]
    n = train_images.shape[0]
    if n == 0:
        raise ValueError("no training images.")
    config = config if config is not None else VQVAEConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQVAEModel(config)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, min(100, steps // 20))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )

    def batches():
        while True:
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                yield train_images[perm[start : start + batch_size]]

    stream = batches()
    history: list[dict[str, float]] = []
    restarts = 0
    usage = torch.zeros(config.codebook_size, dtype=torch.long)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"vq-vae {dataset}", disable=not progress, mininterval=2.0)
    for step in bar:
        batch = next(stream)
        if step == 0:
            with torch.no_grad():
                model.quantizer.init_from(model.encode_latents(batch), gen)
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        usage += torch.bincount(out.codes.flatten().cpu(), minlength=config.codebook_size)
        if (step + 1) % restart_every == 0:
            dead = (usage < dead_code_threshold).nonzero().flatten()
            if step < restart_until * steps and dead.numel():
                with torch.no_grad():
                    model.quantizer.restart_codes(dead, model.encode_latents(batch), gen)
                restarts += dead.numel()
            usage.zero_()
        record = {
            "step": step + 1,
            "loss": out.loss.item(),
            "recon_loss": out.recon_loss.item(),
            "commitment_loss": out.commitment_loss.item(),
            "perplexity": out.perplexity.item(),
        }
        history.append(record)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(recon=f"{record['recon_loss']:.4f}", ppl=f"{record['perplexity']:.0f}")
    train_seconds = time.perf_counter() - t0
    model.eval()
    window = history[-min(50, len(history)) :]
    summary: dict[str, Any] = {
        "dataset": dataset if images is None else "custom",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "num_train": n,
        "train_seconds": round(train_seconds, 2),
        "dead_code_restarts": restarts,
        "first_recon_loss": history[0]["recon_loss"],
        "final_recon_loss": sum(r["recon_loss"] for r in window) / len(window),
        "final_batch_perplexity": sum(r["perplexity"] for r in window) / len(window),
        "config": {k: v for k, v in config.to_diff_dict().items() if k not in ("transformers_version",)},
    }
    if images is None and eval_images:
        test_images, _ = _load_images(dataset, "test")
        summary["test"] = evaluate_reconstruction(model, test_images[:eval_images])
        summary["test"]["num_images"] = int(min(eval_images, len(test_images)))
    if out_dir is not None:
        _atomic_save(model, Path(out_dir), summary)
    return model, summary


@torch.no_grad()
def encode_dataset(model: VQVAEModel, images, batch_size: int = 1000, progress: bool = False) -> np.ndarray:
    """Token grids uint16 `(N, rows, cols)` for `images` (uint8 or float in [0, 1])."""
    if model.config.codebook_size > 65536:
        raise ValueError(f"codebook_size={model.config.codebook_size} does not fit uint16.")
    model.eval()
    images = torch.as_tensor(images)
    rows, cols = model.config.grid_size
    chunks = []
    for start in tqdm(range(0, images.shape[0], batch_size), disable=not progress, desc="encode"):
        ids = model.encode(images[start : start + batch_size])
        chunks.append(ids.view(-1, rows, cols).cpu().numpy().astype(np.uint16))
    if not chunks:
        return np.zeros((0, rows, cols), dtype=np.uint16)
    return np.concatenate(chunks)


def _write_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fpmgm_hf.images.vq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a VQ-VAE tokenizer and save it with save_pretrained")
    tr.add_argument("--dataset", choices=DATASETS, default="mnist")
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True, help="output folder (replaced atomically)")
    tr.add_argument("--num-train", type=int, default=None, help="use only the first N training images")
    tr.add_argument("--hidden-channels", type=int, default=32)
    tr.add_argument("--num-res-blocks", type=int, default=1)
    tr.add_argument("--codebook-size", type=int, default=256)
    tr.add_argument("--code-dim", type=int, default=16)
    tr.add_argument("--commitment-cost", type=float, default=0.25)
    tr.add_argument("--eval-images", type=int, default=10000, help="test images to evaluate (0: skip)")
    tr.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    en = sub.add_parser("encode", help="write token grids + labels of a dataset split to .npz")
    ev = sub.add_parser("eval", help="print reconstruction PSNR and codebook usage on a dataset split")
    for p in (en, ev):
        p.add_argument("--model", required=True, help="folder written by `train` (or any save_pretrained)")
        p.add_argument("--dataset", choices=DATASETS, default="mnist")
        p.add_argument("--split", choices=("train", "test"), default="train" if p is en else "test")
        p.add_argument("--threads", type=int, default=None)
    en.add_argument("--out", required=True, help="output .npz path")
    ev.add_argument("--fid-images", type=int, default=0,
                    help="also compute the reconstruction FID on this many images (with its same-N floor)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.command == "train":
        try:
            config = VQVAEConfig(
                hidden_channels=args.hidden_channels,
                num_res_blocks=args.num_res_blocks,
                codebook_size=args.codebook_size,
                code_dim=args.code_dim,
                commitment_cost=args.commitment_cost,
            )
            _, summary = train_vqvae(
                dataset=args.dataset,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                out_dir=args.out,
                seed=args.seed,
                config=config,
                num_train=args.num_train,
                eval_images=args.eval_images,
            )
        except ValueError as err:
            parser.error(str(err))
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
        return 0

    model = VQVAEModel.from_pretrained(args.model, dtype=torch.float32).eval()
    images, labels = _load_images(args.dataset, args.split)
    if args.command == "eval":
        result = evaluate_reconstruction(model, images)
        if args.fid_images:
            result.update(reconstruction_fid(model, images, args.fid_images))
        print(json.dumps(result))
        return 0
    t0 = time.perf_counter()
    tokens = encode_dataset(model, images, progress=True)
    out = Path(args.out)
    _write_npz(
        out,
        tokens=tokens,
        labels=labels.astype(np.int64),
        codebook_size=np.int64(model.config.codebook_size),
        grid_size=np.asarray(model.config.grid_size, dtype=np.int64),
    )
    print(json.dumps({"out": str(out), "tokens": list(tokens.shape), "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
