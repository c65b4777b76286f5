"""Probes beside the image protocol (`bench/image_eval.py`): one trained model folder, sampled and scored the
protocol's way (class-balanced CFG samples, the protocol's digit classifier, classifier-feature FID beside the test
set), at points the protocol does not sweep.

    # how many shared-block iterations a step needs: 16 steps, 1..12 iterations each
    python bench/image_probe.py --model outputs/images/fp_maskgit_4_1_4/final --num-steps 16 --iters 1 2 4 8 12 \
        --reuse 3sr --num-images 1000 --json docs/images/iterations_probe.json --tag fp_maskgit_4_1_4
    # one budget point of a model trained further
    python bench/image_probe.py --model outputs/images_ext/fp_plus/final --budgets 192 --reuse 3sr \
        --json docs/images/training_probe.json --tag fp_maskgit_4_1_4_plus

Every point lands in --json as soon as it is measured (atomic writes); a point already there is skipped, so an
interrupted probe resumes. --samples keeps each point's images as a compressed .npz.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from image_eval import ROOT, generate, slug, wilson

from fpmgm_hf.evaluation.sweep_report import atomic_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained image model folder (with its vq/)")
    p.add_argument("--tag", required=True, help="the model's name in --json")
    p.add_argument("--protocol", default="outputs/images", help="the image_eval --out with the classifier")
    p.add_argument("--data", choices=["mnist", "fashion_mnist"], default="mnist")
    p.add_argument("--json", required=True, help="results file (created or extended)")
    p.add_argument("--samples", default=None, help="folder for each point's images (.npz); default: none")
    p.add_argument("--reuse", nargs="+", default=["3sr"], choices=["none", "3sr"])
    p.add_argument("--guidance", nargs="+", type=float, default=[4.0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    axis = p.add_mutually_exclusive_group(required=True)
    axis.add_argument("--budgets", nargs="+", type=int, help="block-pass budgets (steps chosen as in the protocol)")
    axis.add_argument("--iters", nargs="+", type=int, help="fixed-point iterations per step, at --num-steps steps")
    p.add_argument("--num-steps", type=int, default=16, help="denoising steps of an --iters point")
    args = p.parse_args(argv)
    if args.num_images < 10:
        p.error(f"--num-images must be >= 10 (one per class), got {args.num_images}")
    return args


def _points(args) -> list[tuple[str, str, float, int | None, int | None]]:
    """(key, reuse, guidance, budget, iterations per step) of every point."""
    if args.budgets:
        axis = [(f"B{b}", b, None) for b in args.budgets]
    else:
        axis = [(f"T{args.num_steps}k{k}", None, k) for k in args.iters]
    return [(f"{args.tag}|{r}|g{g:g}|{name}", r, g, b, k) for r in args.reuse for g in args.guidance
            for name, b, k in axis]


def main(argv=None) -> None:
    from fpmgm_hf.data.assets import load_image_dataset
    from fpmgm_hf.evaluation.metrics import fid_from_features
    from fpmgm_hf.images.digit_classifier import load_classifier
    from fpmgm_hf.images.train import load_image_model

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = ROOT / args.protocol
    results_path = Path(args.json)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    todo = [p for p in _points(args) if p[0] not in results]
    if not todo:
        return
    clf, _ = load_classifier(protocol / "classifier")
    test, _ = load_image_dataset(args.data, "test")
    real = clf.features(test[: args.num_images])
    model, vq = load_image_model(Path(args.model))
    for key, reuse, guidance, budget, iters in todo:
        if iters is not None:  # a fixed step count and iterations per step instead of a budget
            model.generation_config.num_steps = args.num_steps
            model.generation_config.fp_iters_per_step = iters
        images, labels, secs, passes, trips = generate(model, vq, args.num_images, budget, reuse, guidance, args.seed)
        if args.samples:
            Path(args.samples).mkdir(parents=True, exist_ok=True)
            np.savez_compressed(Path(args.samples) / f"{slug(key)}.npz", images=images, labels=labels)
        acc = float((clf.predict(images) == torch.as_tensor(labels)).float().mean())
        results[key] = {"model": args.tag, "reuse": reuse, "guidance": guidance, "budget": budget,
                        "num_steps": args.num_steps if iters is not None else None, "iters_per_step": iters,
                        "n_images": args.num_images, "classifier_accuracy": acc,
                        "classifier_accuracy_ci95": wilson(acc, args.num_images),
                        "fid_classifier": fid_from_features(real, clf.features(images)), "block_passes": passes,
                        "safety_net": trips, "seconds": secs}
        atomic_text(results_path, json.dumps(results, indent=1) + "\n")
        print(f"[probe] {key}: accuracy {acc:.4f}, FID {results[key]['fid_classifier']:.1f}", flush=True)


if __name__ == "__main__":
    main()
