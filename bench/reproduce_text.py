"""The paper's text claims at CPU scale: character-level Shakespeare, compute-optimal sizes, enough samples to
decide each claim. One resumable command.

    .venv/bin/python bench/reproduce_text.py --out outputs/repro            # every stage; re-run to resume
    .venv/bin/python bench/reproduce_text.py --out outputs/repro --only report

Stages (a finished stage is skipped; training stages resume from their last checkpoint):
  tokenizer  character-level tokenizer (every corpus symbol + [UNK], <|endoftext|>, [MASK])
  train      MDLM (--mdlm-layers explicit blocks), its shallow twin (3 explicit blocks, as many distinct blocks as
             FP-MDLM 1/1/1) and FP-MDLM 1/1/1 at the same width, steps and batch, on --workers slots
  study      bench/convert_study.py on the trained MDLM: conversion recipes at --conv-steps steps each
             (docs/conversion); the one closest to the teacher after fine-tuning (held-out NELBO at 8 iterations) is
             the conversion row's recipe unless --conv-recipe is given
  post       the in-domain evaluator (a GPT-2-style character LM on the same training blocks); the consistency
             stage on FP-MDLM (lambda 0.1, stopped at a 15% validation-PPL rise) = CoFRe; the same stage run 3x
             longer without the stop rule (entropy collapse); the MDLM converted with
             `accelerate launch conversion/convert.py` (distillation + consistency); FP-MDLM trained from scratch
             for as many steps as the conversion fine-tunes (conversion vs scratch at equal steps)
  nelbo      held-out NELBO of every model on the same masks (every FP model at 1, 2, 4, 8, 16 and 32 iterations)
  contract   the stability contract (`python -m fpmgm_hf.evaluation.stability`) and the depth profile
             (`python -m fpmgm_hf.evaluation.depth`) of every fixed-point model
  sweep      `fpmgm-eval sweep`: budgets 24..768, best step count per budget (pilots), reuse none/full/3sr,
             schedules decreasing/fixed, adaptive stopping, >= 128 samples per point, two evaluators
  report     docs/reproduction: results.json, README.md with the claims table (bench/repro_claims.py), plots
Every command, seed and wall-clock time is appended to OUT/stages.jsonl.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default="outputs/repro", help="output folder (re-runs resume)")
    a("--docs", default="docs/reproduction", help="where the published report goes ('' = nowhere)")
    a("--conversion-docs", default="docs/conversion", help="where the conversion study's report goes ('' = nowhere)")
    a("--hidden", type=int, default=128, help="width of every masked model")
    a("--heads", type=int, default=4, help="attention heads")
    a("--mdlm-layers", type=int, default=12, help="explicit blocks of the MDLM baseline (the paper's MDLM-12)")
    a("--twin-layers", type=int, default=3, help="explicit blocks of the shallow twin (FP-MDLM's distinct blocks)")
    a("--workers", type=int, default=2, help="stages run side by side (one thread each when 2 on 2 cores)")
    a("--seq-len", type=int, default=128, help="characters per block and per sample")
    a("--batch", type=int, default=32, help="blocks per training step")
    a("--steps", type=int, default=5000, help="pretraining steps of MDLM and FP-MDLM")
    a("--lr", type=float, default=1e-3, help="peak learning rate of MDLM and FP-MDLM")
    a("--cons-steps", type=int, default=600, help="consistency-stage steps (CoFRe)")
    a("--conv-steps", type=int, default=500, help="conversion fine-tuning steps (10%% of the teacher's)")
    a("--conv-recipe", default=None,
      help="extra converter flags of the conversion row (the recipe bench/convert_study.py picked), e.g. "
           "'--hidden-weight 1.0'")
    a("--lm-steps", type=int, default=2500, help="training steps of the character-level evaluation LM")
    a("--budgets", type=int, nargs="+", default=[24, 48, 96, 192, 384, 768], help="sweep budgets")
    a("--side-budgets", type=int, nargs="+", default=[24, 96, 384],
      help="budgets of the side rows (fixed schedule, adaptive stopping, 3x consistency, scratch)")
    a("--samples", type=int, default=128, help="samples per final sweep point")
    a("--pilot-samples", type=int, default=24, help="samples per step-count candidate")
    a("--fp-iters", type=int, nargs="+", default=[1, 2, 4, 8], help="mean iterations per step tried per budget")
    a("--fp-tol", type=float, default=1e-3, help="tolerance of the adaptive-stopping rows")
    a("--eval-lm", default="gpt2-large", help="the general evaluation LM (offline: the SmolLM2 fallback)")
    a("--seed", type=int, default=0, help="seed of every stage")
    a("--only", choices=["tokenizer", "train", "study", "post", "nelbo", "contract", "sweep", "depth", "report"],
      help="run one stage")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- running


def run(cmd: list[str], out: Path, stage: str, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    print(f"[{stage}] {' '.join(map(str, cmd))}", flush=True)
    with open(out / f"{stage.replace(':', '-')}.log", "a") as f:
        proc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    record = {"stage": stage, "cmd": list(map(str, cmd)), "seconds": round(time.time() - t0, 1),
              "threads": threads, "returncode": proc.returncode}
    with open(out / "stages.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if proc.returncode:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); see {out / stage}.log")
    print(f"[{stage}] done in {record['seconds']:.0f} s", flush=True)


def parallel(jobs: list[tuple[str, list]], out: Path, workers: int | None = None) -> None:
    """Run the jobs on `workers` side-by-side slots (default: all at once), splitting the cores between the slots;
    a free slot takes the next job, so no job waits for a slower neighbour."""
    if not jobs:
        return
    workers = min(workers or len(jobs), len(jobs))
    threads = max(1, (os.cpu_count() or 2) // workers)
    with ThreadPoolExecutor(workers) as pool:
        for fut in [pool.submit(run, cmd, out, name, threads) for name, cmd in jobs]:
            fut.result()


def arch(args, layers: tuple) -> dict:
    return {"hidden_size": args.hidden, "num_attention_heads": args.heads, "cond_dim": args.hidden // 2,
            "dropout": 0.0, "max_position_embeddings": args.seq_len, "num_pre_layers": layers[0],
            "num_fp_layers": layers[1], "num_post_layers": layers[2]}


def train_cmd(args, out: Path, name: str, steps: int, *, layers=None, init_from=None, extra=(), fields=None) -> list:
    """fpmgm-train on the character-level blocks; `layers` (and config `fields`) for a fresh model or
    `init_from` a trained one."""
    run_dir = out / name
    cmd = [PY, "-m", "fpmgm_hf.training.train", "--data", "shakespeare", "--tokenizer", out / "tokenizer",
           "--seq-len", args.seq_len, "--batch-size", args.batch, "--max-steps", steps, "--lr", args.lr,
           "--warmup-steps", min(200, max(1, steps // 10)), "--eval-every", max(50, steps // 10),
           "--eval-batches", 20, "--save-every", max(50, steps // 20), "--seed", args.seed, "--out", run_dir]
    if layers is not None:
        cfg = out / f"{name}.json"
        cfg.write_text(json.dumps({**arch(args, layers), **(fields or {})}))
        cmd += ["--config", cfg]
    else:
        cmd += ["--from", init_from]
    cmd += ["--resume", "latest"]  # continues from a checkpoint when there is one
    return cmd + list(extra)


def done(path: Path) -> bool:
    return (path / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ stages


def stage_tokenizer(args, out):
    if (out / "tokenizer" / "tokenizer.json").is_file():
        return
    from fpmgm_hf.data import load_texts, train_char_tokenizer

    t0 = time.time()
    train_char_tokenizer(load_texts("shakespeare"), str(out / "tokenizer"))
    with open(out / "stages.jsonl", "a") as f:
        f.write(json.dumps({"stage": "tokenizer", "seconds": round(time.time() - t0, 1)}) + "\n")


def char_lm_cmd(args, out) -> list:
    return [PY, "-m", "fpmgm_hf.evaluation", "train-lm", "--tokenizer", out / "tokenizer", "--out", out / "char-lm",
            "--seq-len", args.seq_len, "--max-steps", args.lm_steps, "--seed", args.seed, "--resume"]


def last_step(log: Path, default: int = 0) -> int:
    """The highest step a run's log.jsonl records (`default` when there is no log or no step)."""
    lines = log.read_text().splitlines() if log.is_file() else []
    return max((r["step"] for r in map(json.loads, lines) if "step" in r), default=default)


def lm_done(args, out) -> bool:
    """final/ appears at the first validation (best so far), so finished means: the last step was logged."""
    return last_step(out / "char-lm" / "log.jsonl") >= args.lm_steps


def stage_train(args, out):
    """MDLM, the shallow twin and FP-MDLM, trained identically (--workers side by side)."""
    jobs = []
    for name, layers in (("mdlm", (args.mdlm_layers, 0, 0)), ("fp", (1, 1, 1)), ("twin", (args.twin_layers, 0, 0))):
        if not done(out / name / "final"):
            jobs.append((name, train_cmd(args, out, name, args.steps, layers=layers)))
    parallel(jobs, out, workers=args.workers)


def cons_cmd(args, out, name: str, steps: int, stop: bool) -> list:
    extra = ["--consistency-weight", 0.1, "--consistency-warmup", max(1, args.cons_steps // 5)]
    extra += ["--stop-ppl-rise", 0.15] if stop else []
    return train_cmd(args, out, name, steps, init_from=out / "fp" / "final", extra=extra)


def stage_study(args, out):
    """The conversion recipe study on the trained MDLM (two row sets side by side), then its report and choice."""
    import convert_study

    choice = out / "study_choice.json"
    if choice.is_file() or not done(out / "mdlm" / "final"):
        return
    common = [PY, str(ROOT / "bench" / "convert_study.py"), "--teacher", out / "mdlm" / "final",
              "--out", out / "convert-study", "--steps", args.conv_steps, "--batch", args.batch, "--seed", args.seed]
    rows = list(convert_study.ROWS)
    halves = [rows[: (len(rows) + 1) // 2], rows[(len(rows) + 1) // 2:]]
    parallel([(f"study-{i}", common + ["--docs", "", "--rows", *half]) for i, half in enumerate(halves) if half],
             out, workers=args.workers)
    run(common + ["--docs", args.conversion_docs], out, "study-report", 1)
    results = [json.loads((out / "convert-study" / f"{r}.json").read_text()) for r in rows]
    best = min(results, key=lambda r: r["after"]["nelbo"]["8"])
    mapping, extra, _ = convert_study.ROWS[best["row"]]
    choice.write_text(json.dumps({"row": best["row"], "recipe": " ".join(["--map", mapping, *extra])}, indent=1))


def conv_recipe(args, out) -> str:
    """--conv-recipe, else the study's choice, else KL distillation with --map auto."""
    if args.conv_recipe is not None:
        return args.conv_recipe
    choice = out / "study_choice.json"
    return json.loads(choice.read_text())["recipe"] if choice.is_file() else ""


def conv_cmd(args, out) -> list:
    """The MDLM converted by the documented path (`--map auto`, the teacher's framing and held-out split, read from
    its training_data.json) with the recipe `--conv-recipe`, for --conv-steps fine-tuning steps."""
    return [Path(PY).parent / "accelerate", "launch", "--num_processes", 1, "--cpu", "conversion/convert.py",
            "--mdlm", out / "mdlm" / "final", "--layers", "1/1/1", "--data", "shakespeare", "--seq-len", args.seq_len,
            "--steps", args.conv_steps, "--batch-size", args.batch, "--kl-warmup", max(1, args.conv_steps // 5),
            "--consistency-warmup", max(1, args.conv_steps // 5), "--eval-every", max(50, args.conv_steps // 10),
            "--save-every", max(50, args.conv_steps // 10), "--seed", args.seed, "--output", out / "conv",
            "--work-dir", out / "conv-work", "--resume", "latest", *conv_recipe(args, out).split()]


def stage_post(args, out):
    """CoFRe and the conversion, the evaluation LM beside them (the sweep needs it, training does not)."""
    jobs = [] if lm_done(args, out) else [("char-lm", char_lm_cmd(args, out))]
    if not done(out / "cons" / "final"):
        jobs.append(("cons", cons_cmd(args, out, "cons", args.cons_steps, stop=True)))
    if not done(out / "conv"):
        jobs.append(("conv", conv_cmd(args, out)))
    parallel(jobs, out, workers=args.workers)
    jobs = []
    if not done(out / "cons-long" / "final"):
        jobs.append(("cons-long", cons_cmd(args, out, "cons-long", 3 * args.cons_steps, stop=False)))
    if not done(out / "fp-short" / "final"):
        jobs.append(("fp-short", train_cmd(args, out, "fp-short", args.conv_steps, layers=(1, 1, 1))))
    parallel(jobs, out, workers=args.workers)


MODELS = {  # name -> (folder under OUT, baseline)
    "MDLM": ("mdlm/final", True),
    "shallow twin": ("twin/final", True),
    "FP-MDLM": ("fp/final", False),
    "FP-MDLM + L_CONS": ("cons/final", False),
    "FP-MDLM + L_CONS (3x, no stop)": ("cons-long/final", False),
    "converted": ("conv", False),
    "FP-MDLM, scratch (conversion steps)": ("fp-short/final", False),
}
SCHED = "FP-MDLM + L_CONS, 4 iterations per step"  # sweep rows of the CoFRe model under a name of their own
ALIASES = {SCHED: "FP-MDLM + L_CONS"}  # sweep-only names -> the trained model they sample


def stage_nelbo(args, out):
    path = out / "nelbo.json"
    if path.is_file():
        return
    from repro_claims import heldout_nelbo

    results = {name: heldout_nelbo(out / sub, out / "tokenizer", args) for name, (sub, _) in MODELS.items()
               if done(out / sub)}
    path.write_text(json.dumps(results, indent=1))


def stage_depth(args, out):
    """The depth profile of every fixed-point model (OUT/depth/*.json), at the step counts the sweep picked for
    CoFRe (3SR) at B24, B96 and B384 (8, 32, 96 where it has not run)."""
    from fpmgm_hf.evaluation.depth import main as depth

    steps = [str(sweep_pick(out, "FP-MDLM + L_CONS|3sr", b, default)) for b, default in ((24, 8), (96, 32), (384, 96))]
    per_fp_model(args, out, "depth", depth, ["--steps", *steps])


def per_fp_model(args, out: Path, what: str, cli, extra=()) -> None:
    """Run a per-model measurement CLI (`evaluation.stability` / `.depth` main) on every trained fixed-point model,
    into OUT/<what>/<model>.json; a finished measurement is not rerun."""
    (out / what).mkdir(exist_ok=True)
    for name, (sub, baseline) in MODELS.items():
        path = out / what / f"{slug(name)}.json"
        if baseline or path.is_file() or not done(out / sub):
            continue
        print(f"[{what}] {name}", flush=True)
        cli([str(out / sub), "--tokenizer", str(out / "tokenizer"), "--seq-len", str(args.seq_len),
             "--seed", str(args.seed), *extra, "--json", str(path)])


def sweep_pick(out: Path, call: str, budget: int, default: int) -> int:
    """The step count a sweep call picked at `budget` (its non-pilot point), else `default`."""
    path = out / "sweep" / slug(call) / "results.json"
    points = json.loads(path.read_text())["points"] if path.is_file() else []
    return next((p["num_steps"] for p in points if p["budget"] == budget and p["status"] == "ok"), default)


def stage_contract(args, out):
    """The stability contract (docs/stability) on every trained fixed-point model, written to OUT/contract/."""
    from fpmgm_hf.evaluation.stability import main as contract

    per_fp_model(args, out, "contract", contract)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def sweep_jobs(args, out) -> list[tuple[str, list]]:
    """(name, command) of every sweep call: one per model and row family."""
    common = ["--budgets", *args.budgets, "--num-samples", args.samples, "--pilot-samples", args.pilot_samples,
              "--fp-iters", *args.fp_iters, "--seq-len", args.seq_len, "--batch-size", 64,
              "--eval-lm", out / "char-lm" / "final", args.eval_lm, "--eval-lm-names", "char-lm", "general",
              "--seed", args.seed]
    # The paper's rows at every budget with the step-count pilots; the side questions (schedule, adaptive
    # stopping, collapse, conversion vs scratch) at --side-budgets with the middle step count, to fit the machine.
    side = ["--budgets", *args.side_budgets, "--fp-iters", 2]  # after `common`: argparse keeps the last value
    sched = ["--budgets", 96, 384, "--fp-iters", 4]
    calls = [
        ("MDLM", ["--reuse", "none"]),
        ("shallow twin", ["--reuse", "none"]),
        ("FP-MDLM", ["--reuse", "none"]),
        ("FP-MDLM|3sr", ["--reuse", "3sr"]),
        ("FP-MDLM + L_CONS|3sr", ["--reuse", "3sr"]),
        ("FP-MDLM + L_CONS|none", ["--reuse", "none"]),
        ("FP-MDLM + L_CONS|full", ["--reuse", "full"]),
        ("converted", ["--reuse", "3sr"]),
        ("FP-MDLM + L_CONS|fixed", ["--reuse", "3sr", "--fp-schedule", "fixed", *side]),
        # with 1-2 iterations per step the decreasing schedule rounds to the fixed one: compare them at 4
        (f"{SCHED}|decreasing", ["--reuse", "3sr", "--fp-schedule", "decreasing", *sched]),
        (f"{SCHED}|fixed", ["--reuse", "3sr", "--fp-schedule", "fixed", *sched]),
        ("FP-MDLM, scratch (conversion steps)", ["--reuse", "3sr"]),
        ("FP-MDLM + L_CONS (3x, no stop)", ["--reuse", "3sr", *side]),
        ("FP-MDLM + L_CONS|tol", ["--reuse", "3sr", "--fp-tol", args.fp_tol, *side]),
    ]
    jobs = []
    for call, rows in calls:
        name = call.split("|")[0]
        folder = out / MODELS[ALIASES.get(name, name)][0]
        if done(folder):
            cmd = [PY, "-m", "fpmgm_hf.evaluation", "sweep", "--model", folder, "--names", name, *common, *rows,
                   "--out", out / "sweep" / slug(call)]
            jobs.append((f"sweep:{slug(call)}", cmd))
    return jobs


def stage_sweep(args, out):
    """Every sweep call, two at a time, in the order listed (the paper's rows first)."""
    jobs = [(name, cmd) for name, cmd in sweep_jobs(args, out)
            if not (out / "sweep" / name.split(":", 1)[1] / "results.json").is_file()]
    parallel(jobs, out, workers=2)


def stage_report(args, out):
    from repro_claims import write_report

    write_report(out, Path(args.docs) if args.docs else None, args)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = {"tokenizer": stage_tokenizer, "train": stage_train, "study": stage_study, "post": stage_post,
              "nelbo": stage_nelbo,
              "contract": stage_contract, "sweep": stage_sweep, "depth": stage_depth, "report": stage_report}
    t0 = time.time()
    for name, fn in stages.items():
        if args.only in (None, name):
            fn(args, out)
    print(f"[reproduce] finished in {(time.time() - t0) / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
