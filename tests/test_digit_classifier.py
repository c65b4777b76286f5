"""The digit classifier that judges generated images: it learns, saves without pickle, and reloads exactly."""

import numpy as np
import pytest
import torch

from fpmgm_hf.images.digit_classifier import load_classifier, train_classifier


def pattern_images(n, seed=0):
    """Three classes of 28x28 uint8 images: a bar on the left, the middle or the right, with noise."""
    g = np.random.default_rng(seed)
    labels = g.integers(0, 3, n)
    images = (g.random((n, 28, 28)) * 60).astype(np.uint8)
    for i, y in enumerate(labels):
        images[i, 4:24, 3 + 9 * y:8 + 9 * y] = 255
    return images, labels


def test_classifier_learns_saves_and_reloads(tmp_path):
    x, y = pattern_images(600)
    xt, yt = pattern_images(200, seed=1)
    torch.set_num_threads(1)
    model, summary = train_classifier(x, y, xt, yt, epochs=2, batch_size=50, out_dir=tmp_path / "clf")
    assert summary["test_accuracy"] > 0.95
    again, saved = load_classifier(tmp_path / "clf")
    assert saved == summary and not list(tmp_path.glob(".tmp-*"))
    torch.testing.assert_close(again.features(xt), model.features(xt))
    assert again.features(xt).shape == (200, 64) and again.features(xt).dtype == torch.float64
    assert (again.predict(xt) == torch.as_tensor(yt)).float().mean() == summary["test_accuracy"]
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        load_classifier(tmp_path)
