"""How varied a sample set is within each class: the trace of the within-class covariance of the protocol's
digit-classifier features, averaged over the classes, beside the same for the test set at the same N.

    python bench/image_spread.py docs/images/samples/*.npz

Each .npz holds `images` (N, 28, 28) uint8 and the requested `labels` (N,), as `bench/image_eval.py` and
`bench/image_probe.py` write them. Two columns: over every sample of a class, and over only those the classifier
assigns to the requested class (so off-class samples do not inflate the spread).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def within_class_spread(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of trace(cov(features of the class)); features (N, D), labels (N,)."""
    classes = [c for c in np.unique(labels) if (labels == c).sum() > 1]
    return float(np.mean([np.trace(np.cov(features[labels == c].T)) for c in classes]))


def main(argv=None) -> None:
    from fpmgm_hf.data.assets import load_image_dataset
    from fpmgm_hf.images.digit_classifier import load_classifier

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="+", help=".npz sample files")
    p.add_argument("--protocol", default="outputs/images", help="the image_eval --out with the classifier")
    p.add_argument("--data", choices=["mnist", "fashion_mnist"], default="mnist")
    args = p.parse_args(argv)
    clf, _ = load_classifier(Path(args.protocol) / "classifier")

    def row(name, images, labels):
        feats = clf.features(images).double().numpy()  # (N, D)
        ok = clf.predict(images).numpy() == labels
        print(f"| {name} | {len(labels)} | {within_class_spread(feats, labels):.1f} | "
              f"{within_class_spread(feats[ok], labels[ok]):.1f} ({100 * ok.mean():.1f}% on class) |")

    print("| sample set | N | within-class spread | on-class samples only |\n|---|---|---|---|")
    n = None
    for path in args.samples:
        with np.load(path) as d:
            images, labels = d["images"], d["labels"]
        n = len(labels)
        row(Path(path).stem, images, labels)
    test, test_labels = load_image_dataset(args.data, "test")
    row(f"{args.data} test", test[:n], np.asarray(test_labels)[:n])


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
