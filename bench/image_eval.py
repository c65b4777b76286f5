"""Image benchmark on CPU: MaskGIT (12 and 24 explicit layers) vs FP-MaskGIT (4/1/4, with and without the
fixed-point state norm) and a CoFRe stage on the state-norm model.

    .venv/bin/python bench/image_eval.py --data mnist --steps 600 --cofre-steps 150 --cofre-weight 0.1 \
        --num-images 80 --out outputs/image_eval --docs docs/images      # ~1 h on one busy CPU thread

Each model is trained in its own subprocess (`fpmgm_hf.image_train.main`, one thread), which records its wall
time, the median optimizer-step time and its peak resident memory (`resource.getrusage(RUSAGE_SELF).ru_maxrss`,
which includes the Python/torch baseline of a few hundred MB). CoFRe continues the state-norm FP-MaskGIT export
with the consistency loss (`FPMGMConfig.fp_state_norm`: the paper's map inflates the state when iterated
past the training range, see docs/images/RESULTS.md). Every model then generates `--num-images` class-balanced
images at each compute budget (transformer-block passes per sample; classifier-free guidance, Halton order,
3SR, confidence sampler), decoded by the VQ tokenizer, and FID is computed with the TF-FID Inception network
against the same number of MNIST test images. Small-N FID is strongly biased upwards: compare values within this table
only; the table also gives FID(test vs other test images) at the same N as a noise floor.

`docs/images/RESULTS.md` is rewritten after every finished cell, so an interrupted run leaves a partial table.
`--skip-train` reuses the exported models under `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SN = "FP-MaskGIT 4/1/4 + state norm"
MODELS = {  # name -> (preset of a model trained from scratch, or None; the model a CoFRe stage continues)
    "MaskGIT-12": ("maskgit-tiny-12", None),
    "MaskGIT-24": ("maskgit-tiny-24", None),
    "FP-MaskGIT 4/1/4": ("fp-maskgit-tiny-paper", None),
    SN: ("fp-maskgit-tiny-sn", None),
    SN + " + CoFRe": (None, SN),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower().replace("__", "_")


# ------------------------------------------------------------------------------------------- training


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). `ru_maxrss` is not used: Linux carries it over `exec` from
    the forking parent, so a child would report the bench's own peak (the Inception net)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_child(argv: list[str], report: str) -> None:
    """Runs inside the subprocess: train, then write time and peak memory."""
    torch.set_num_threads(1)
    from fpmgm_hf.image_train import main

    t0 = time.perf_counter()
    final = main(argv)
    wall = time.perf_counter() - t0
    out = argv[argv.index("--out") + 1]
    times = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    steps = [r["time"] for r in times if "loss" in r and "event" not in r]
    diffs = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    evals = [r for r in times if "val_ce" in r]
    with open(report, "w") as f:
        json.dump({"final": final, "wall_s": wall, "median_step_s": statistics.median(diffs) if diffs else None,
                   "steps": len(steps), "maxrss_mb": peak_rss_mb(),
                   "val_ce_first": evals[0]["val_ce"] if evals else None,
                   "val_ce_last": evals[-1]["val_ce"] if evals else None}, f, indent=1)


def train(name: str, args, steps=None, root=None) -> dict:
    """Train `name` in a subprocess (`steps` overrides the step count, `root` the output root)."""
    preset, base_name = MODELS[name]
    out = Path(root or args.out) / slug(name)
    report = out / "train_report.json"
    if args.skip_train and root is None and report.is_file():
        return json.loads(report.read_text())
    argv = ["--data", args.data, "--out", str(out), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--warmup-steps", str(args.warmup), "--eval-every", str(args.eval_every if root is None else 0),
            "--eval-batches", "10", "--save-every", "0", "--threads", "1", "--cpu"]
    if preset:
        argv += ["--preset", preset, "--max-steps", str(steps or args.steps), "--lr", str(args.lr)]
    else:
        base = Path(args.out) / slug(base_name) / "final"
        cofre_steps = steps or args.cofre_steps
        argv += ["--from", str(base), "--max-steps", str(cofre_steps), "--lr", str(args.lr / 2),
                 "--consistency-weight", str(args.cofre_weight),
                 "--consistency-warmup", str(max(1, args.cofre_steps // 4))]
    out.mkdir(parents=True, exist_ok=True)
    if (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), "_train", str(report), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    with open(out / "train_stdout.txt", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return json.loads(report.read_text())


# ----------------------------------------------------------------------------------------- evaluation


def generate(model, vq, n: int, budget: int, guidance: float, seed: int) -> tuple[np.ndarray, float]:
    labels = torch.arange(n) % model.config.num_classes
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(batch_size=n, class_labels=labels, guidance_scale=guidance, sampler="confidence",
                             order="halton", reuse="3sr", budget=budget, randomness=1.0, temperature=1.0,
                             generator=g)
        images = vq.decode(ids)
    secs = time.perf_counter() - t0
    return (images[:, 0].numpy() * 255).round().astype(np.uint8), secs


def write_png(path, images: np.ndarray, cols: int = 10, pad: int = 2) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from generate_images import save_grid

    save_grid(path, images, cols=cols, pad=pad)


def write_results(args, trains: dict, fids: dict, gen_secs: dict, floor, n: int, profile=None) -> None:
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    budgets = args.budgets
    lines = ["# Image results (MNIST, class-conditional, CPU)", "",
             f"Generated by `bench/image_eval.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
             "", "Setup: VQ tokenizer `outputs/vq/" + args.data + "` (28x28 -> 7x7 codes, codebook 256). "
             f"Training: {args.steps} steps, batch {args.batch_size}, lr {args.lr}, warm-up {args.warmup}, "
             f"one CPU thread (shared 2-core machine); CoFRe: {args.cofre_steps} further steps from the state-norm "
             f"FP-MaskGIT export, consistency weight {args.cofre_weight} (ramped over the first quarter; distance "
             f"between layer-normalised hidden states, `objectives.hidden_consistency`), lr {args.lr / 2}. "
             f"Sampling: confidence sampler, Halton order, 3SR, CFG scale {args.guidance}, randomness 1.0, "
             f"class-balanced labels. Budget = transformer-block passes per sample (the CFG null branch is "
             f"not counted).", "",
             f"**FID uses only N = {n} generated vs {n} MNIST test images** through the TF-FID Inception net; at "
             f"this N, FID is dominated by small-sample bias, so only compare within the table. Noise floor: "
             f"FID(test vs {n} other test images) = " + (f"{floor:.1f}" if floor is not None else "n/a") + ".",
             "", "## FID by budget", "",
             "| model | " + " | ".join(f"B={b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for name in MODELS:
        cells = [("diverged" if fids[(name, b)] is None else f"{fids[(name, b)]:.1f}") if (name, b) in fids
                 else "–" for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "`diverged`: the fixed-point solver produced non-finite iterates during sampling "
              "(FloatingPointError from the solver), so no images.", ""]
    profile = profile or {}
    lines += ["", "## Training cost", "",
              "| model | steps | wall (s) | median step in run (s) | profiled step (s) | est. train time (s) "
              "| peak RSS (MB) | val masked CE start → end |",
              "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        t, q = trains.get(name), profile.get(name)
        if t is None:
            lines.append(f"| {name} |" + " – |" * 7)
            continue
        ce = (f"{t['val_ce_first']:.3f} → {t['val_ce_last']:.3f}" if t.get("val_ce_first") is not None else "–")
        prof = f"{q['median_step_s']:.2f}" if q else "–"
        est = f"{q['median_step_s'] * t['steps']:.0f}" if q else "–"
        rss = f"{q['maxrss_mb']:.0f}" if q else "–"
        lines.append(f"| {name} | {t['steps']} | {t['wall_s']:.0f} | {t['median_step_s']:.2f} | {prof} | {est} | "
                     f"{rss} | {ce} |")
    lines += ["", "Wall time includes the start-up, the validation passes and the export, on a 2-core machine "
              "shared with another long training job, so it drifts with the load. `profiled step` is the median "
              f"optimizer-step time of {args.profile_steps}-step runs made back to back at the end (fairer "
              "across models); `est. train time` = profiled step x steps. Peak RSS is the peak resident set "
              "(VmHWM) of that profiling subprocess, Python + torch baseline included. The CoFRe row is the extra "
              "stage only (add the FP-MaskGIT row for the total).", "",
              "## Generation time (s for all N samples, CFG doubles the batch)", "",
              "| model | " + " | ".join(f"B={b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for name in MODELS:
        cells = [f"{gen_secs[(name, b)]:.1f}" if gen_secs.get((name, b)) is not None else "–" for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Sample grids (largest budget that did not diverge, 4 rows x 10 classes, one class per column): "
              + ", ".join(f"`{slug(m)}.png`" for m in MODELS) + ".", ""]
    (docs / "RESULTS.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist", choices=["mnist", "fashion_mnist"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--cofre-steps", type=int, default=100)
    p.add_argument("--cofre-weight", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--budgets", type=int, nargs="+", default=[48, 96, 192, 384])
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default="outputs/image_eval")
    p.add_argument("--docs", default="docs/images")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--profile-steps", type=int, default=20,
                   help="Steps of the back-to-back short runs that measure step time and peak memory (0 = skip).")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from fpmgm_hf.assets import load_image_dataset
    from fpmgm_hf.image_train import load_image_model
    from fpmgm_hf.metrics import InceptionFeatures, fid_from_features

    n = args.num_images
    test_images, _ = load_image_dataset(args.data, "test")
    inception = InceptionFeatures(batch_size=32)
    t0 = time.perf_counter()
    real = inception(test_images[:n])
    print(f"inception: {n} images in {time.perf_counter() - t0:.0f}s", flush=True)
    trains, fids, gen_secs, floor = {}, {}, {}, None
    for name in args.models:
        trains[name] = train(name, args)
        print(name, json.dumps(trains[name]), flush=True)
        write_results(args, trains, fids, gen_secs, floor, n)
    floor = fid_from_features(real, inception(test_images[n:2 * n]))
    cells_path = Path(args.out) / "cells.json"  # finished cells, reused by a rerun with --skip-train
    cells = json.loads(cells_path.read_text()) if args.skip_train and cells_path.is_file() else {}
    for name in args.models:
        model, vq = load_image_model(trains[name]["final"])
        for b in args.budgets:
            key = f"{name}|{b}"
            if key not in cells:
                try:
                    images, secs = generate(model, vq, n, b, args.guidance, args.seed)
                    cells[key] = {"fid": fid_from_features(real, inception(images)), "gen_s": secs}
                    write_png(Path(args.docs) / f"{slug(name)}.png", images[:min(n, 40)], cols=10)
                    cells[key]["grid"] = True
                except FloatingPointError as err:  # the fixed-point iterates left the finite range
                    cells[key] = {"fid": None, "gen_s": None, "error": str(err)[:200]}
                cells_path.write_text(json.dumps(cells, indent=1))
            cell = cells[key]
            fids[(name, b)] = cell["fid"]
            gen_secs[(name, b)] = cell["gen_s"]
            print(f"{name} budget {b}: {json.dumps(cell)[:200]}", flush=True)
            write_results(args, trains, fids, gen_secs, floor, n)
    profile = {}
    if args.profile_steps:
        del inception
        for name in args.models:
            profile[name] = train(name, args, steps=args.profile_steps, root=Path(args.out) / "profile")
            print("profile", name, json.dumps(profile[name]), flush=True)
            write_results(args, trains, fids, gen_secs, floor, n, profile=profile)
    (Path(args.out) / "results.json").write_text(json.dumps(
        {"num_images": n, "floor": floor, "train": trains, "profile": profile,
         "fid": {f"{k[0]}|{k[1]}": v for k, v in fids.items()},
         "gen_s": {f"{k[0]}|{k[1]}": v for k, v in gen_secs.items()}}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_train":
        _train_child(sys.argv[3:], sys.argv[2])
    else:
        main()
