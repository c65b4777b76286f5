"""FP-MaskGIT vs MaskGIT on MNIST, measured so that it can separate models: several epochs of training, a digit
classifier that checks the samples are the requested digits, and FID on thousands of samples beside its floor.

    .venv/bin/python bench/image_eval.py --out outputs/images --docs docs/images           # every stage, resumable

Stages (a finished stage is skipped):
  vq          VQ-VAE tokenizer, 28x28 -> 7x7 codes from 256 (`python -m fpmgm_hf.images.vq train`), then token grids
  classifier  a small CNN trained by the project (>= 99% test accuracy), weights in OUT/classifier
  train       MaskGIT-12 (the baseline) and FP-MaskGIT 4/1/4 (the default fixed-point map), side by side with one
              thread each, so their step time and peak memory compare under the same load; then the CoFRe
              consistency stage on FP-MaskGIT
  cost        training time per step and peak memory, FP-MaskGIT / MaskGIT-12, measured side by side in one run:
              each model trains `--cost-steps` steps in its own process (its own peak RSS), the two alternating over
              `--cost-rounds` rounds at one thread each so that a change in machine load hits both
  eval        per model, reuse (none / 3sr) and budget: `--num-images` class-balanced samples (CFG, Halton order,
              confidence sampler), decoded by the VQ tokenizer; class-conditional accuracy under the classifier,
              Fréchet distance in the classifier's feature space (every point) and in Inception's (at each model's
              best point), both beside their floors (test vs train images at the same N); a point where any solve
              needed the solver's safety net (a best-iterate stop) or any image is non-finite has status "diverged"
  report      docs/images/results.json, README.md (accuracy with Wilson intervals, the 95% target per model,
              sizing and training cost, sample grids; docs/images/findings.md is appended when present, and
              the docs folder's *_probe.json files from bench/image_probe.py go into results.json's "probes")
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fpmgm_hf.evaluation.sweep_report import atomic_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = {  # name -> (preset, baseline, stage it continues)
    "MaskGIT-12": ("maskgit-tiny-12", True, None),
    "FP-MaskGIT 4/1/4": ("fp-maskgit-tiny", False, None),
    "FP-MaskGIT 4/1/4 + CoFRe": (None, False, "FP-MaskGIT 4/1/4"),
}
# the cost stage's models: the paper's -48.6% time / -50.7% memory is FP-MaskGIT 4/4 against MaskGIT-Large (24
# layers); against MaskGIT-12 its own table gives +19.1% time / +27.0% memory (9h08 vs 7h40, 35.74 vs 28.14 GiB)
COST_MODELS = {"MaskGIT-12": "maskgit-tiny-12", "FP-MaskGIT 4/1/4": "fp-maskgit-tiny", "MaskGIT-24": "maskgit-tiny-24"}
PAPER_COST = {"MaskGIT-12": {"step_time": 548 / 460, "memory": 35.74 / 28.14},
              "MaskGIT-24": {"step_time": 548 / 1066, "memory": 35.74 / 72.45}}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower().replace("__", "_")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="mnist", choices=["mnist", "fashion_mnist"])
    a("--out", default="outputs/images")
    a("--docs", default="docs/images", help="where results.json, README.md and the grids go ('' = nowhere)")
    a("--vq-steps", type=int, default=3000)
    a("--classifier-epochs", type=int, default=5)
    a("--epochs", type=float, default=3.0, help="training epochs over the 60k training grids")
    a("--batch-size", type=int, default=64)
    a("--lr", type=float, default=1e-3)
    a("--cofre-steps", type=int, default=400)
    a("--budgets", type=int, nargs="+", default=[48, 96, 192, 384])
    a("--reuse", nargs="+", default=["none", "3sr"])
    a("--none-budgets", type=int, nargs="+", default=None,
      help="budgets of the fixed-point models' reuse=none rows (default: all of --budgets); the no-reuse baseline "
           "is where 3SR is compared, the low budgets where it matters")
    a("--cofre-reuse", nargs="+", default=None, help="reuse modes of the CoFRe rows (default: --reuse)")
    a("--num-images", type=int, default=2000, help="samples per point (class-balanced)")
    a("--guidance", type=float, nargs="+", default=[2.0],
      help="classifier-free guidance scales: every point is sampled at each (a swept axis, like the budget)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=1, help="torch threads for every stage (1 leaves the other core free)")
    a("--cost-steps", type=int, default=30, help="timed training steps per model and round of the cost stage")
    a("--cost-rounds", type=int, default=3, help="alternating rounds of the cost stage")
    a("--probe", action="store_true",
      help="a quick look before the measured run: only the eval stage of the models trained so far, into "
           "OUT/probe_cells.json (no Inception FID, no cost stage, no report), e.g. to choose --guidance")
    a("--models", nargs="+", default=None, choices=list(MODELS), metavar="NAME",
      help=f"only these models' training and eval stages, no cost stage or report, e.g. to evaluate one model on a "
           f"free core while another trains (default: all of {list(MODELS)})")
    a("--parallel", action="store_true",
      help="train MaskGIT and FP-MaskGIT at the same time (one thread each); default: one after the other")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ stages


def stage_vq(args, out: Path) -> None:
    vq, codes = out / "vq", out / "codes"
    py = [sys.executable, "-m", "fpmgm_hf.images.vq"]
    if not (vq / "config.json").is_file():
        subprocess.run(py + ["train", "--dataset", args.data, "--steps", str(args.vq_steps), "--out", str(vq),
                             "--seed", str(args.seed), "--threads", str(args.threads)], check=True, cwd=ROOT)
    for split in ("train", "test"):
        path = codes / f"{args.data}_{split}.npz"
        if not path.is_file():
            subprocess.run(py + ["encode", "--model", str(vq), "--dataset", args.data, "--split", split,
                                 "--out", str(path), "--threads", str(args.threads)], check=True, cwd=ROOT)


def stage_classifier(args, out: Path) -> dict:
    from fpmgm_hf.data.assets import load_image_dataset
    from fpmgm_hf.images.digit_classifier import load_classifier, train_classifier

    if not (out / "classifier" / "classifier.json").is_file():
        tr, ytr = load_image_dataset(args.data, "train")
        te, yte = load_image_dataset(args.data, "test")
        train_classifier(tr, ytr, te, yte, epochs=args.classifier_epochs, seed=args.seed, out_dir=out / "classifier")
    return load_classifier(out / "classifier")[1]


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


PAUSE_S = 60.0  # a step-to-step gap this long is a stop and resume, not training


def log_summary(run: Path) -> dict:
    """Step count, median step time, training time and the first and last validation CE from RUN/log.jsonl.

    The training time sums the step-to-step gaps below `PAUSE_S`, so a run stopped and resumed across sessions
    counts only the time it trained (a process's own wall time would count only its last segment)."""
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    times = [r["time"] for r in log if "loss" in r and "event" not in r]
    evals = [r for r in log if "val_ce" in r]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"steps": len(times), "median_step_s": statistics.median(gaps) if gaps else None,
            "train_s": sum(g for g in gaps if g < PAUSE_S),
            "val_ce": [evals[0]["val_ce"], evals[-1]["val_ce"]] if evals else None}


def _train_child(argv: list[str], report: str) -> None:
    """Runs inside the subprocess: train, then write the median step time and the peak memory."""
    torch.set_num_threads(1)
    from fpmgm_hf.images.train import main

    t0 = time.perf_counter()
    final = main(argv)
    summary = log_summary(Path(argv[argv.index("--out") + 1]))
    Path(report).write_text(json.dumps({"final": final, "wall_s": time.perf_counter() - t0, **summary,
                                        "peak_rss_mb": peak_rss_mb()}, indent=1))


def train_cmd(name: str, args, out: Path, threads: int) -> tuple[list, Path]:
    preset, _, base = MODELS[name]
    run = out / slug(name)
    steps = int(args.epochs * 60000 / args.batch_size) if preset else args.cofre_steps
    argv = ["--data", str(out / "codes" / f"{args.data}_train.npz"), "--vq", str(out / "vq"), "--out", str(run),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--warmup-steps", "200",
            "--eval-every", str(max(100, steps // 6)), "--eval-batches", "20",
            "--save-every", str(max(50, steps // 10)), "--threads", str(threads), "--cpu",
            "--max-steps", str(steps)]
    if preset:
        argv += ["--preset", preset, "--lr", str(args.lr)]
    else:
        argv += ["--from", str(out / slug(base) / "final"), "--lr", str(args.lr / 2), "--consistency-weight", "0.1",
                 "--consistency-warmup", str(max(1, steps // 4)), "--stop-ppl-rise", "0.15"]
    argv += ["--resume", "latest"]  # continues from a checkpoint when there is one
    return [sys.executable, str(Path(__file__).resolve()), "_train", str(run / "train_report.json"), *argv], run


def stage_train(args, out: Path) -> dict:
    groups = [["MaskGIT-12", "FP-MaskGIT 4/1/4"]] if args.parallel else [["MaskGIT-12"], ["FP-MaskGIT 4/1/4"]]
    for group in groups + [["FP-MaskGIT 4/1/4 + CoFRe"]]:
        procs = []
        todo = [n for n in group if n in args.models]
        threads = 1 if len(todo) > 1 else args.threads  # two trainings at 2 threads each on 2 cores run 3x slower
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
        for name in todo:
            cmd, run = train_cmd(name, args, out, threads)
            if not (run / "train_report.json").is_file():
                run.mkdir(parents=True, exist_ok=True)
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(run / "stdout.txt", "a"),
                                              stderr=subprocess.STDOUT))
        if any(p.wait() for p in procs):
            raise RuntimeError(f"training {group} failed; see {out}/*/stdout.txt")
    return {name: r for name, r in finished_trainings(out).items() if name in args.models}


def finished_trainings(out: Path) -> dict:
    """The training reports of the models whose training has finished (name -> report)."""
    reports = {name: out / slug(name) / "train_report.json" for name in MODELS}
    return {name: json.loads(path.read_text()) for name, path in reports.items() if path.is_file()}


def _cost_child(preset: str, codes: str, steps: int, batch: int, seed: int, report: str) -> None:
    """Runs inside a subprocess: `steps` MaskGIT training steps of a fresh `preset` model after 3 untimed ones;
    writes the median step time and this process's peak RSS."""
    torch.set_num_threads(1)
    from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration
    from fpmgm_hf.images.train import image_model_fields, load_token_grids
    from fpmgm_hf.training.objectives import maskgit_loss

    tokens, labels, info = load_token_grids(codes)
    base = peak_rss_mb()  # imports and data: what both processes hold before a model exists
    torch.manual_seed(seed)
    model = FPMGMForMaskedGeneration(FPMGMConfig(**image_model_fields(preset, info["codebook_size"],
                                                                     info["grid_size"], 10))).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    times = []
    for step in range(steps + 3):
        idx = torch.randint(0, tokens.shape[0], (batch,), generator=g)
        t0 = time.perf_counter()
        loss, _ = maskgit_loss(model, tokens[idx], generator=g, class_labels=labels[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    Path(report).write_text(json.dumps({"median_step_s": statistics.median(times), "peak_rss_mb": peak_rss_mb(),
                                        "training_mb": peak_rss_mb() - base,
                                        "params": sum(p.numel() for p in model.parameters())}))


def stage_cost(args, out: Path) -> dict:
    """FP-MaskGIT 4/1/4 against MaskGIT-12 and MaskGIT-24: step time and peak RSS, alternating processes (each
    round starts with another model), medians over rounds; `ratios_vs` holds FP / each baseline."""
    path = out / "cost.json"
    if path.is_file():
        cost = json.loads(path.read_text())
        if set(COST_MODELS) <= set(cost):
            return cost
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {name: [] for name in COST_MODELS}
    for r in range(args.cost_rounds):
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]  # a change in load hits every model
        for name in order:
            report = out / f"cost_{slug(name)}_{r}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "_cost", COST_MODELS[name],
                   str(out / "codes" / f"{args.data}_train.npz"), str(args.cost_steps), str(args.batch_size),
                   str(args.seed), str(report)]
            subprocess.run(cmd, check=True, cwd=ROOT, env=env)
            runs[name].append(json.loads(report.read_text()))
    cost = {name: {"median_step_s": statistics.median(r["median_step_s"] for r in rs),
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                   "training_mb": statistics.median(r["training_mb"] for r in rs), "params": rs[0]["params"],
                   "rounds": len(rs), "steps_per_round": args.cost_steps} for name, rs in runs.items()}
    fp = cost["FP-MaskGIT 4/1/4"]
    cost["ratios_vs"] = {base: {"step_time": fp["median_step_s"] / cost[base]["median_step_s"],
                                "peak_rss": fp["peak_rss_mb"] / cost[base]["peak_rss_mb"],
                                "training_memory": fp["training_mb"] / cost[base]["training_mb"],
                                "params": fp["params"] / cost[base]["params"],
                                "paper": PAPER_COST[base]} for base in ("MaskGIT-12", "MaskGIT-24")}
    cost["ratios"] = cost["ratios_vs"]["MaskGIT-12"]  # the schema's name for the comparison of the sweep
    atomic_text(path, json.dumps(cost, indent=1))
    return cost


# -------------------------------------------------------------------------------------------------- eval


def generate(model, vq, n: int, budget: int, reuse: str, guidance: float, seed: int):
    """`n` class-balanced samples: (uint8 images (n, 28, 28), requested labels (n,), seconds, block passes,
    safety-net counts {"diverged", "cold_start", "solves"} over every solve of every sample)."""
    labels = torch.arange(n) % model.config.num_classes
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    images, passes, trips = [], [], {"diverged": 0, "cold_start": 0, "solves": 0}
    with torch.no_grad():
        for i in range(0, n, 500):
            res = model.generate(batch_size=min(500, n - i), class_labels=labels[i:i + 500], guidance_scale=guidance,
                                 sampler="confidence", order="halton", reuse=reuse, budget=budget, randomness=1.0,
                                 temperature=1.0, generator=g, return_dict_in_generate=True)
            images.append(vq.decode(res.sequences))
            passes.append(res.block_passes.float())
            for step in res.step_stats:
                for flag in ("diverged", "cold_start"):
                    trips[flag] += int((step[flag] & step["ran"]).sum())
                trips["solves"] += int(step["ran"].sum())
    decoded = torch.cat(images)[:, 0]  # (n, 28, 28) in [0, 1]
    trips["nonfinite_images"] = int((~torch.isfinite(decoded)).flatten(1).any(1).sum())
    images = (decoded.nan_to_num(0.0).numpy() * 255).round().astype(np.uint8)
    return images, labels.numpy(), time.perf_counter() - t0, float(torch.cat(passes).mean()), trips


def _plan(args, name: str) -> list[tuple[str, int, float]]:
    """(reuse, budget, guidance) of every point of a model: a plain stack has no reuse; `--none-budgets` and
    `--cofre-reuse` thin out the fixed-point rows."""
    if MODELS[name][1]:
        return [("none", b, g) for b in args.budgets for g in args.guidance]
    modes = args.cofre_reuse if (args.cofre_reuse and "CoFRe" in name) else args.reuse
    return [(r, b, g) for r in modes for b in args.budgets for g in args.guidance
            if r != "none" or args.none_budgets is None or b in args.none_budgets]


def cell_key(name: str, reuse: str, budget: int, guidance: float) -> str:
    return f"{name}|{reuse}|{budget}|{guidance:g}"


def parse_key(key: str) -> tuple[str, str, int, float]:
    parts = key.split("|")
    if len(parts) != 4:
        raise SystemExit(f"cells.json: point {key!r} is not 'model|reuse|budget|guidance' (written before guidance "
                         "was an axis?); move that file away to re-evaluate")
    name, reuse, budget, guidance = parts
    return name, reuse, int(budget), float(guidance)


def stage_eval(args, out: Path, trains: dict) -> dict:
    from fpmgm_hf.data.assets import load_image_dataset
    from fpmgm_hf.evaluation.metrics import fid_from_features
    from fpmgm_hf.images.digit_classifier import load_classifier
    from fpmgm_hf.images.train import load_image_model

    clf, _ = load_classifier(out / "classifier")
    n = args.num_images
    test, _ = load_image_dataset(args.data, "test")
    train_imgs, _ = load_image_dataset(args.data, "train")
    real = clf.features(test[:n])
    prefix = "probe_" if args.probe else ""
    cells_path = out / f"{prefix}cells.json"
    cells = json.loads(cells_path.read_text()) if cells_path.is_file() else {}
    cells.setdefault("floor", {"classifier": fid_from_features(real, clf.features(train_imgs[:n]))})
    for name in trains:
        model, vq = load_image_model(trains[name]["final"])
        for reuse, budget, guidance in _plan(args, name):
            key = cell_key(name, reuse, budget, guidance)
            if key in cells:
                continue
            images, labels, secs, passes, trips = generate(model, vq, n, budget, reuse, guidance, args.seed)
            np.savez_compressed(out / f"{prefix}samples_{slug(key)}.npz", images=images, labels=labels)
            acc = float((clf.predict(images) == torch.as_tensor(labels)).float().mean())
            fid = fid_from_features(real, clf.features(images))
            # a point is "ok" only if no solve needed the safety net's best-iterate stop and every image is finite
            status = "ok" if trips["diverged"] == 0 and trips["nonfinite_images"] == 0 else "diverged"
            cells[key] = {"classifier_accuracy": acc, "fid_classifier": fid, "seconds": secs,
                          "block_passes": passes, "safety_net": trips, "status": status}
            atomic_text(cells_path, json.dumps(cells, indent=1))
            print(f"[images] {key}: {json.dumps(cells[key])}", flush=True)
    if not args.probe:
        _inception(args, out, cells, test)
    atomic_text(cells_path, json.dumps(cells, indent=1))
    return cells


def _inception(args, out: Path, cells: dict, test) -> None:
    """Inception FID at each model's best point (by classifier FID), and its floor."""
    from fpmgm_hf.data.assets import load_image_dataset
    from fpmgm_hf.evaluation.metrics import InceptionFeatures, fid_from_features

    n = args.num_images
    best = {}
    for key, cell in cells.items():
        if key == "floor":
            continue
        name = key.split("|")[0]
        if name not in best or cell["fid_classifier"] < cells[best[name]]["fid_classifier"]:
            best[name] = key
    todo = [k for k in best.values() if "fid_inception" not in cells[k]]
    if not todo and "inception" in cells["floor"]:
        return
    inception = InceptionFeatures(batch_size=50)
    real = inception(test[:n])
    if "inception" not in cells["floor"]:
        cells["floor"]["inception"] = fid_from_features(real, inception(load_image_dataset(args.data, "train")[0][:n]))
    for key in todo:
        samples = np.load(out / f"samples_{slug(key)}.npz")["images"]
        cells[key]["fid_inception"] = fid_from_features(real, inception(samples))
        print(f"[images] inception FID {key}: {cells[key]['fid_inception']:.2f}", flush=True)


# ------------------------------------------------------------------------------------------------ report


def wilson(accuracy: float, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a binomial share (95% at z = 1.96): [low, high]."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) ** 0.5
    return [centre - half, centre + half]


def training_row(args, cells: int, name: str, report: dict, cost: dict) -> dict:
    """A model's training report with its sizing: parameters and tokens seen (steps x batch x `cells` per grid)."""
    params = cost.get(name.replace(" + CoFRe", ""), {}).get("params")
    run = Path(report["final"]).parent
    summary = log_summary(run) if (run / "log.jsonl").is_file() else {}  # a report from before train_s
    row = {**{k: v for k, v in report.items() if k != "final"}, **summary}
    tokens = row["steps"] * args.batch_size * cells
    return {**row, "params": params, "batch_size": args.batch_size, "tokens_seen": tokens}


def _probes(docs: Path) -> dict:
    """bench/image_probe.py's results in DOCS (more training, iterations, guidance): {file stem: {point: row}}.
    Other *_probe.json files (an `--probe` run's cells, of other models) stay out: their rows name no model."""
    found = {f.stem: json.loads(f.read_text()) for f in sorted(docs.glob("*_probe.json"))}
    return {k: v for k, v in found.items() if all(isinstance(r, dict) and "model" in r for r in v.values())}


def stage_report(args, out: Path, trains: dict, cells: dict, clf_summary: dict, cost: dict) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from generate_images import save_grid

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    sweep = []
    for key, cell in cells.items():
        if key == "floor":
            continue
        name, reuse, budget, guidance = parse_key(key)
        sweep.append({"model": name, "baseline": MODELS[name][1], "reuse": reuse, "budget": budget,
                      "guidance": guidance,
                      "n_images": args.num_images, "classifier_accuracy": cell["classifier_accuracy"],
                      "classifier_accuracy_ci95": wilson(cell["classifier_accuracy"], args.num_images),
                      "fid_classifier": cell["fid_classifier"], "fid_inception": cell.get("fid_inception"),
                      "status": cell["status"], "block_passes": cell["block_passes"],
                      "safety_net": cell.get("safety_net"), "seconds": cell.get("seconds")})
    with np.load(out / "codes" / f"{args.data}_train.npz") as codes:
        cells_per_grid = int(np.prod(codes["tokens"].shape[1:]))  # tokens per image: (N, 7, 7) -> 49
    payload = {"dataset": args.data, "fid_floor": cells["floor"]["classifier"],
               "fid_floor_inception": cells["floor"].get("inception"),
               "classifier_test_accuracy": clf_summary["test_accuracy"], "sweep": sweep,
               "training": {k: training_row(args, cells_per_grid, k, t, cost) for k, t in trains.items()},
               "training_cost": cost,
               "probes": _probes(docs)}
    atomic_text(docs / "results.json", json.dumps(payload, indent=1) + "\n")
    for name in MODELS:
        best = min((s for s in sweep if s["model"] == name), key=lambda s: s["fid_classifier"])
        key = cell_key(name, best["reuse"], best["budget"], best["guidance"])
        data = np.load(out / f"samples_{slug(key)}.npz")
        order = np.argsort(data["labels"][:100], kind="stable")  # ten of each class, one class per column
        grid = data["images"][:100][order].reshape(10, 10, 28, 28).transpose(1, 0, 2, 3).reshape(100, 28, 28)
        save_grid(docs / f"{slug(name)}.png", grid, cols=10)
    _write_readme(args, docs, payload)


def _accuracy(row: dict) -> str:
    lo, hi = row["classifier_accuracy_ci95"]
    flag = "" if row["status"] == "ok" else " **diverged**"
    return f"{100 * row['classifier_accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]{flag}"


def _table(args, rows: list[dict]) -> list[str]:
    """Accuracy [95% interval] / classifier FID, one row per (model, reuse, guidance), one column per budget."""
    budgets = sorted({r["budget"] for r in rows})
    lines = ["| model | reuse | g | " + " | ".join(f"B{b}" for b in budgets) + " |",
             "|---|---|---|" + "---|" * len(budgets)]
    for name in MODELS:
        combos = sorted({(r["reuse"], r["guidance"]) for r in rows if r["model"] == name},
                        key=lambda x: (args.reuse.index(x[0]) if x[0] in args.reuse else 9, x[1]))
        for reuse, g in combos:
            cells = []
            for b in budgets:
                hit = [r for r in rows if (r["model"], r["reuse"], r["budget"], r["guidance"]) == (name, reuse, b, g)]
                cells.append(f"{_accuracy(hit[0])} / {hit[0]['fid_classifier']:.1f}" if hit else "—")
            lines.append(f"| {name} | {reuse} | {g:g} | " + " | ".join(cells) + " |")
    return lines


def _targets(rows: list[dict], target: float = 0.95) -> list[str]:
    """The issue's accuracy target, judged on each model's most accurate point."""
    lines = [f"Each model's most accurate point against the {100 * target:.0f}% target:", ""]
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["classifier_accuracy"])
        lo, hi = best["classifier_accuracy_ci95"]
        verdict = ("meets it" if best["classifier_accuracy"] >= target else
                   "below it, but its interval reaches it" if hi >= target else "below it")
        lines.append(f"- {name} ({best['reuse']}, B{best['budget']}, g {best['guidance']:g}): {_accuracy(best)}, "
                     f"{verdict}.")
    bad = [r for r in rows if r["status"] != "ok"]
    lines.append("- Points where the solver's safety net stopped a solve or an image was non-finite: "
                 + (", ".join(f"{r['model']} {r['reuse']} B{r['budget']}" for r in bad) if bad else "none") + ".")
    return lines


def _training_lines(payload: dict) -> list[str]:
    lines = ["## Training", "",
             "| model | parameters | steps (batch) | tokens seen | training time (min) | median step (s) "
             "| peak RSS (MB) | val masked CE start → end |", "|---|---|---|---|---|---|---|---|"]
    for name, t in payload["training"].items():
        ce = f"{t['val_ce'][0]:.3f} → {t['val_ce'][1]:.3f}" if t.get("val_ce") else "–"
        params = f"{t['params']:,}" if t.get("params") else "–"
        minutes = t.get("train_s", t["wall_s"]) / 60
        lines.append(f"| {name} | {params} | {t['steps']} ({t['batch_size']}) | {t['tokens_seen']:,} | "
                     f"{minutes:.0f} | {t['median_step_s']:.3f} | {t['peak_rss_mb']:.0f} | {ce} |")
    cost = payload["training_cost"]
    fp = cost["FP-MaskGIT 4/1/4"]
    lines += ["", "Training cost measured side by side (`cost` stage: "
              f"{fp['rounds']} rounds of {fp['steps_per_round']} steps per model, each round started by another "
              "model, one thread, each model in its own process; "
              "memory = what the training adds to the process). FP-MaskGIT 4/1/4 against each baseline, beside the "
              "paper's ratio for the same pair (FP-MaskGIT 4/4 on ImageNette, A100):", "",
              "| FP-MaskGIT 4/1/4 vs | step time (s) | FP / baseline | paper | training memory (MB) | FP / baseline "
              "| paper | parameters | FP / baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for base, r in cost["ratios_vs"].items():  # stage_cost recomputes a cost.json that predates ratios_vs
        b, paper = cost[base], r["paper"]
        lines.append(f"| {base} | {fp['median_step_s']:.3f} vs {b['median_step_s']:.3f} | {r['step_time']:.3f} | "
                     f"{paper['step_time']:.3f} | {fp['training_mb']:.0f} vs {b['training_mb']:.0f} | "
                     f"{r['training_memory']:.3f} | {paper['memory']:.3f} | {fp['params']:,} vs {b['params']:,} | "
                     f"{r['params']:.3f} |")
    lines += ["", "The per-model rows of the training table ran under other loads (the two base models side by "
              "side, CoFRe alone): compare step times only through this table. Training time sums the step-to-step "
              f"gaps under {PAUSE_S:.0f} s, so stops and resumes across sessions are not counted."]
    return lines


def _write_readme(args, docs: Path, payload: dict) -> None:
    rows = payload["sweep"]
    guid = ", ".join(f"{g:g}" for g in sorted({r["guidance"] for r in rows}))
    lines = ["# Images: FP-MaskGIT vs MaskGIT on MNIST (class-conditional, CPU)", "",
             f"Written by `python bench/image_eval.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             f"{args.num_images} class-balanced samples per point (CFG scale g = {guid}, Halton order, confidence "
             f"sampler); the project's digit classifier has {100 * payload['classifier_test_accuracy']:.2f}% test "
             f"accuracy. Classifier-feature FID floor (test vs train images, N = {args.num_images}): "
             f"{payload['fid_floor']:.2f}" + (f"; Inception floor {payload['fid_floor_inception']:.2f}"
                                              if payload.get("fid_floor_inception") is not None else "") + ".", "",
             "Class-conditional accuracy (share classified as the requested digit) [Wilson 95% interval] / "
             "classifier-feature FID (one sample set per point, so no interval on FID):", ""]
    lines += _table(args, rows) + [""] + _targets(rows)
    lines += ["", "Inception FID at each model's best point (by classifier FID): " + ", ".join(
        f"{r['model']} ({r['reuse']}, B{r['budget']}, g {r['guidance']:g}) {r['fid_inception']:.2f}" for r in rows
        if r.get("fid_inception") is not None) + ".", ""]
    lines += _training_lines(payload)
    lines += ["", "Samples at each model's best point (ten per digit, one digit per column): "
              + ", ".join(f"![{n}]({slug(n)}.png)" for n in MODELS)]
    if (docs / "findings.md").is_file():
        lines += ["", (docs / "findings.md").read_text()]
    atomic_text(docs / "README.md", "\n".join(lines) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    subset, args.models = args.models is not None, args.models or list(MODELS)
    torch.set_num_threads(args.threads)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage_vq(args, out)
    clf_summary = stage_classifier(args, out)
    if args.probe:  # the models trained so far, nothing else
        stage_eval(args, out, finished_trainings(out))
        return
    trains = stage_train(args, out)
    if subset:  # a part of the run: its cells land in OUT/cells.json for the full run to reuse
        stage_eval(args, out, trains)
        return
    cost = stage_cost(args, out)
    cells = stage_eval(args, out, trains)
    if args.docs:
        stage_report(args, out, trains, cells, clf_summary, cost)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_train":
        _train_child(sys.argv[3:], sys.argv[2])
    elif len(sys.argv) > 2 and sys.argv[1] == "_cost":
        preset, codes, steps, batch, seed, report = sys.argv[2:8]
        _cost_child(preset, codes, int(steps), int(batch), int(seed), report)
    else:
        main()
