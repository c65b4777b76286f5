"""A small convolutional digit classifier for judging generated MNIST-like images: class-conditional accuracy
(the share of samples classified as the class they were asked for) and a Fréchet distance in its penultimate
feature space (cheap enough for every sweep point, unlike Inception).

    from fpmgm_hf.images.digit_classifier import train_classifier, load_classifier
    model, summary = train_classifier(train_images, train_labels, test_images, test_labels, out_dir="clf")
    acc = (model.predict(images) == labels).float().mean()
    feats = model.features(images)                 # (N, 64), for fid_from_features

Images are uint8 `(N, 28, 28)` (or `(N, 1, 28, 28)`). Weights are saved as safetensors with a JSON summary
(nothing pickled); training draws batches, shifts and dropout from explicit generators.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
WEIGHTS, SUMMARY = "classifier.safetensors", "classifier.json"


class DigitClassifier(nn.Module):
    """conv(32) -> pool -> conv(64) -> pool -> fc(64) -> fc(10); about 220k parameters (16 / 32 channels reach
    only 98.8% here)."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 7 * 7, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}

    @staticmethod
    def _prepare(images) -> Tensor:
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
        if x.dim() == 3:
            x = x[:, None]  # (N, 1, 28, 28)
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def _trunk(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, w, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 2w, 7, 7)
        return F.relu(self.fc1(x.flatten(1)))  # (N, feature_dim)

    def forward(self, x: Tensor, dropout: Optional[torch.Generator] = None) -> Tensor:
        h = self._trunk(x)
        if dropout is not None:  # inverted dropout with an explicit generator
            keep = torch.rand(h.shape, generator=dropout) >= 0.3
            h = h * keep / 0.7
        return self.fc2(h)

    @torch.no_grad()
    def features(self, images, batch_size: int = 1000) -> Tensor:
        """Penultimate features `(N, feature_dim)` in float64."""
        self.eval()
        x = self._prepare(images)
        return torch.cat([self._trunk(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]).double()

    @torch.no_grad()
    def predict(self, images, batch_size: int = 1000) -> Tensor:
        """Predicted classes `(N,)`."""
        self.eval()
        x = self._prepare(images)
        return torch.cat([self.fc2(self._trunk(x[i:i + batch_size])).argmax(-1)
                          for i in range(0, x.shape[0], batch_size)])


def _shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Random translations of up to `max_shift` pixels (zero padding), one per image."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    H, W = x.shape[-2:]
    return torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(n)])


def train_classifier(train_images, train_labels, test_images, test_labels, *, epochs: int = 5,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     out_dir: Optional[str | os.PathLike] = None) -> tuple[DigitClassifier, dict]:
    """Train with AdamW (cosine schedule) and random shifts; returns the model and a summary with its test
    accuracy. With `out_dir`, the weights and the summary are written atomically there."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    x = DigitClassifier._prepare(train_images)
    y = torch.as_tensor(np.asarray(train_labels)).long()
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (x.shape[0] // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0] - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], g), dropout=g), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    model.eval()
    acc = float((model.predict(test_images) == torch.as_tensor(np.asarray(test_labels))).float().mean())
    summary = {"test_accuracy": acc, "epochs": epochs, "steps": step, "seed": seed, "config": model.config,
               "parameters": sum(p.numel() for p in model.parameters())}
    if out_dir is not None:
        save_classifier(model, summary, out_dir)
    return model, summary


def save_classifier(model: DigitClassifier, summary: dict, out_dir) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-classifier-", dir=out.parent))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def load_classifier(path) -> tuple[DigitClassifier, dict]:
    """The classifier saved in `path` (safetensors + JSON; a missing or mismatched tensor is an error)."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (WEIGHTS, SUMMARY):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: no {name}; train the classifier first (train_classifier).")
    summary = json.loads((path / SUMMARY).read_text())
    model = DigitClassifier(**summary["config"])
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return model.eval(), summary
