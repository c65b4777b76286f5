"""The paper's text comparison (Tables 2 and 9) at CPU scale, end to end and resumable.

    .venv/bin/python bench/reproduce_text.py --out outputs/repro          # every stage; re-run to resume
    .venv/bin/python bench/reproduce_text.py --out outputs/repro --only sweep

Stages (each is skipped when its output exists; training stages resume from their last checkpoint):
  tokenizer  byte-level BPE with 4096 tokens trained on Shakespeare (GPT-2's 50k-token output layer
             would dominate CPU time at this width)
  mdlm       MDLM, 12 explicit layers, width 256, length 128
  fp         FP-MDLM 1/1/1 (concat_mlp) at the same width, same steps and batch
  cons       the consistency stage on FP-MDLM (lambda 0.1, early stop at a 15% validation-PPL rise)
  conv       the trained MDLM converted with conversion/convert.py (layers 1,6,12 -> 1/1/1)
  sweep      budgets 96/192/384/768 for MDLM, FP-MDLM (none / full reuse), FP-MDLM + L_CONS,
             CoFRe (+ 3SR) and the converted model; generative perplexity + entropy + plot
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
ARCH = {"hidden_size": 256, "num_attention_heads": 4, "cond_dim": 128, "dropout": 0.0, "max_position_embeddings": 128}


def run(cmd: list[str], log: Path, out: Path, stage: str, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    print(f"[{stage}] {' '.join(cmd)}", flush=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    record = {"stage": stage, "cmd": cmd, "seconds": round(time.time() - t0, 1), "returncode": proc.returncode}
    with open(out / "stages.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if proc.returncode:
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); see {log}")
    print(f"[{stage}] done in {record['seconds']:.0f} s", flush=True)


def train_cmd(args, out: Path, name: str, layers: tuple, lr: float, steps: int, extra=()) -> list[str]:
    cfg = out / f"{name}.json"
    cfg.write_text(
        json.dumps(dict(ARCH, num_pre_layers=layers[0], num_fp_layers=layers[1], num_post_layers=layers[2]))
    )
    run_dir = out / name
    cmd = [
        PY,
        "-m",
        "fpmgm_hf.train",
        "--data",
        "shakespeare",
        "--tokenizer",
        str(out / "tokenizer"),
        "--config",
        str(cfg),
        "--seq-len",
        "128",
        "--batch-size",
        str(args.batch),
        "--max-steps",
        str(steps),
        "--lr",
        str(lr),
        "--warmup-steps",
        "100",
        "--eval-every",
        str(max(50, steps // 10)),
        "--eval-batches",
        "10",
        "--save-every",
        "100",
        "--seed",
        str(args.seed),
        "--out",
        str(run_dir),
        *extra,
    ]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*")):
        cmd += ["--resume", "latest"]
    return cmd


def stage_tokenizer(args, out):
    if (out / "tokenizer" / "tokenizer.json").exists():
        return
    t0 = time.time()
    from fpmgm_hf.assets import load_text_corpus
    from fpmgm_hf.data import train_bpe_tokenizer

    train_bpe_tokenizer(load_text_corpus("shakespeare"), 4096, str(out / "tokenizer"))
    with open(out / "stages.jsonl", "a") as f:
        f.write(json.dumps({"stage": "tokenizer", "seconds": round(time.time() - t0, 1)}) + "\n")


def stage_train(args, out):
    jobs = []
    if not (out / "mdlm" / "final").is_dir():
        jobs.append(("mdlm", train_cmd(args, out, "mdlm", (12, 0, 0), args.lr_mdlm, args.steps)))
    if not (out / "fp" / "final").is_dir():
        jobs.append(("fp", train_cmd(args, out, "fp", (1, 1, 1), args.lr_fp, args.steps)))
    _parallel(jobs, out)


def cons_cmd(args, out: Path) -> list[str]:
    """The consistency stage on the pretrained FP-MDLM (lambda 0.1 ramped over a fifth, 15% PPL-rise stop)."""
    extra = ["--from", str(out / "fp" / "final"), "--consistency-weight", "0.1",
             "--consistency-warmup", str(args.cons_steps // 5), "--stop-ppl-rise", "0.15"]
    cmd = train_cmd(args, out, "cons", (1, 1, 1), args.lr_fp, args.cons_steps, extra)
    i = cmd.index("--config")
    del cmd[i : i + 2]  # --from brings its own config
    return cmd


def conv_cmd(args, out: Path) -> list[str]:
    """The trained MDLM converted with conversion/convert.py: layers 1, 6, 12 -> 1/1/1, distillation."""
    return [PY, "conversion/convert.py", "--mdlm", str(out / "mdlm" / "final"), "--map", "1,6,12",
            "--layers", "1/1/1", "--tokenizer", str(out / "tokenizer"), "--data", "shakespeare", "--seq-len", "128",
            "--steps", str(args.conv_steps), "--batch-size", str(args.batch), "--kl-warmup", str(args.conv_steps // 5),
            "--seed", str(args.seed), "--output", str(out / "conv"), "--overwrite"]


def stage_post(args, out):
    jobs = []
    if not (out / "cons" / "final").is_dir():
        jobs.append(("cons", cons_cmd(args, out)))
    if not (out / "conv" / "config.json").exists():
        jobs.append(("conv", conv_cmd(args, out)))
    _parallel(jobs, out)


def _parallel(jobs, out):
    if not jobs:
        return
    threads = max(1, (os.cpu_count() or 2) // len(jobs))
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(run, cmd, out / f"{name}.log", out, name, threads) for name, cmd in jobs]
        for fut in futures:
            fut.result()


def stage_sweep(args, out):
    models = [
        ("MDLM", out / "mdlm" / "final", ["none"]),
        ("FP-MDLM", out / "fp" / "final", ["none", "full"]),
        ("FP-MDLM+LCONS", out / "cons" / "final", ["none", "3sr"]),
        ("converted", out / "conv", ["none", "3sr"]),
    ]
    for name, path, reuse in models:
        if not (path / "config.json").exists():
            print(f"[sweep] skipping {name}: {path} missing", flush=True)
            continue
        cmd = [
            PY,
            "-m",
            "fpmgm_hf.evaluation",
            "sweep",
            "--model",
            str(path),
            "--names",
            name,
            "--budgets",
            *map(str, args.budgets),
            "--reuse",
            *reuse,
            "--fp-iters",
            *map(str, args.fp_iters),
            "--num-samples",
            str(args.samples),
            "--seq-len",
            "128",
            "--batch-size",
            str(args.samples),
            "--eval-lm",
            args.eval_lm,
            "--seed",
            str(args.seed),
            "--out",
            str(out / "sweep" / name),
        ]
        run(cmd, out / "sweep.log", out, f"sweep:{name}", os.cpu_count() or 2)
    merge_sweeps(out, args.docs)


def merge_sweeps(out: Path, docs: str | None = None) -> None:
    from fpmgm_hf.evaluation import SweepPoint, markdown_table, plot

    points, lm = [], {}
    for res in sorted((out / "sweep").glob("*/results.json")):
        data = json.loads(res.read_text())
        lm = data["eval_lm"]
        points += [SweepPoint(**p) for p in data["points"]]
    if not points:
        return
    # CoFRe is FP-MDLM + L_CONS sampled with 3SR: name that row after the recipe.
    for p in points:
        if p.model == "FP-MDLM+LCONS" and p.reuse == "3sr":
            p.model = "CoFRe"
    (out / "results.md").write_text(markdown_table(points, lm))
    plot(points, out / "quality_vs_budget.png", title=f"Shakespeare, CPU scale; eval LM {lm.get('name')}")
    print((out / "results.md").read_text())
    if docs:
        write_report(out, Path(docs))


def _val_curve(log: Path) -> str:
    """'first -> ... -> last' validation PPL of a training log."""
    if not log.exists():
        return "n/a"
    vals = [json.loads(line) for line in log.read_text().splitlines()]
    ppl = [(r["step"], r["val_ppl"]) for r in vals if "val_ppl" in r]
    if not ppl:
        return "n/a"
    shown = ppl[:: max(1, len(ppl) // 5)]
    shown += [] if shown[-1] == ppl[-1] else ppl[-1:]
    return " → ".join(f"{v:.0f} (step {s})" for s, v in shown)


def write_report(out: Path, docs: Path) -> None:
    """docs/…/README.md: the table, the plot, every stage's command and wall time, the validation curves."""
    import shutil

    docs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "quality_vs_budget.png", docs / "quality_vs_budget.png")
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    lines = ["# Small-scale reproduction of the paper's text comparison (Tables 2 and 9)", "",
             f"Written by `bench/reproduce_text.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from "
             f"`{out}`. Machine: the project's 2-core CPU (no GPU); stages ran two at a time, one thread each.", "",
             (out / "results.md").read_text(), "![quality vs budget](quality_vs_budget.png)", "",
             "## Validation perplexity during training (NELBO bound, same held-out blocks)", "",
             "| model | validation PPL |", "|---|---|"]
    for name, sub in (("MDLM 12/0/0", "mdlm"), ("FP-MDLM 1/1/1", "fp"), ("+ L_CONS stage", "cons")):
        lines.append(f"| {name} | {_val_curve(out / sub / 'log.jsonl')} |")
    conv = out / "conv" / "conversion.json"
    if conv.exists():
        c = json.loads(conv.read_text())
        lines.append(f"| converted (teacher NELBO {c['verify_before']['teacher_nelbo']:.3f}) | NELBO "
                     f"{c['verify_before']['converted_nelbo']:.3f} before fine-tuning → "
                     f"{c['verify_after']['converted_nelbo']:.3f} after |")
    lines += ["", "## Stages (commands, seeds, wall-clock time)", "", "| stage | seconds | command |", "|---|---|---|"]
    for s in stages:
        cmd = " ".join(str(c).replace(str(ROOT) + "/", "") for c in s.get("cmd", []))
        note = " (failed; rerun below)" if s.get("returncode") else ""
        note += f" ({s['note']})" if s.get("note") else ""
        lines.append(f"| {s['stage']}{note} | {s['seconds']:.0f} | `{cmd}` |")
    if (docs / "findings.md").exists():  # hand-written analysis kept next to the generated report
        lines += ["", (docs / "findings.md").read_text()]
    (docs / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {docs / 'README.md'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/repro", help="output folder (re-runs resume)")
    p.add_argument("--steps", type=int, default=1200, help="pretraining steps of MDLM and FP-MDLM")
    p.add_argument("--cons-steps", type=int, default=250, help="consistency-stage steps")
    p.add_argument("--conv-steps", type=int, default=250, help="conversion fine-tuning steps")
    p.add_argument("--batch", type=int, default=8, help="blocks of 128 tokens per step")
    p.add_argument("--lr-mdlm", type=float, default=1e-3, help="MDLM peak LR (paper ratio MDLM:FP = 3:2)")
    p.add_argument("--lr-fp", type=float, default=6.7e-4, help="FP-MDLM peak LR")
    p.add_argument("--budgets", type=int, nargs="+", default=[96, 192, 384, 768], help="sweep budgets")
    p.add_argument("--samples", type=int, default=8, help="samples per sweep point")
    p.add_argument("--fp-iters", type=int, nargs="+", default=[2, 8],
                   help="FP models: mean iterations per step tried at each budget (best kept)")
    p.add_argument("--eval-lm", default="gpt2-large", help="evaluation LM (offline: SmolLM2 fallback)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--only", choices=["tokenizer", "train", "post", "sweep", "report"], help="run one stage")
    p.add_argument("--docs", default="docs/reproduction", help="where the published report goes ('' = nowhere)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = {"tokenizer": stage_tokenizer, "train": stage_train, "post": stage_post, "sweep": stage_sweep,
              "report": lambda a, o: merge_sweeps(o, a.docs)}
    for name, fn in stages.items():
        if args.only == name or (args.only is None and name != "report"):
            fn(args, out)


if __name__ == "__main__":
    main()
