"""Run every benchmark and write `bench/RESULTS.md` (outputs verbatim, with the commands and the machine).

    .venv/bin/python bench/run_all.py                                  # ~10 min on 2 idle CPU cores
    .venv/bin/python bench/run_all.py --trained outputs/repro/cons/final --only solver

Benchmarks: parameter counts (meta device), generation time per block pass FP-MDLM vs MDLM (both
injections), training cost (step time and peak memory, two vocabulary sizes) and solver convergence (picard /
anderson x none / full / 3SR) on a trained FP model, which `--trained` names (the default is the CPU-scale
reproduction's CoFRe model when it exists, else the demo's). Timings are only comparable within one run:
run this on an otherwise idle machine. Each benchmark runs in its own process; a failing one is reported
in the file and the others still run.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("outputs/repro/cons/final", "outputs/repro/fp/final", "outputs/demo/fp-mdlm")


def benches(trained: str | None) -> list[tuple[str, str, list[str]]]:
    """(key, title, argv after the interpreter)."""
    out = [
        ("params", "Parameter counts (MDLM-small sizes)", ["bench/param_count.py"]),
        # One thread: at two, two identical MDLMs already differ by 2-7% (the A/A column), as large as the effect.
        ("speed", "Generation time per block pass, constrained injection (the default)",
         ["bench/generate_speed.py", "--injection", "constrained", "--repeats", "15", "--threads", "1"]),
        ("speed", "Generation time per block pass, concat_mlp injection (the paper's map)",
         ["bench/generate_speed.py", "--injection", "concat_mlp", "--no-savings", "--repeats", "15",
          "--threads", "1"]),
        ("train", "Training cost, GPT-2 vocabulary (50,258)",
         ["bench/train_cost.py", "--hidden", "256", "--heads", "4", "--seq-len", "128", "--batch", "8",
          "--steps", "6"]),
        ("train", "Training cost, 512-token vocabulary (the blocks dominate)",
         ["bench/train_cost.py", "--hidden", "256", "--heads", "4", "--seq-len", "128", "--batch", "8",
          "--steps", "6", "--vocab", "512"]),
        # Issue 27: full vocabulary, FP-MDLM at 32 steps against MDLM at 8, at one and at eight sequences.
        ("sampling", "Sampling at a real vocabulary (50,258), FP-MDLM 32 steps vs MDLM 8 steps",
         ["bench/sampling_speed.py", "--batch", "1", "8", "--budgets", "96", "--repeats", "1"]),
        ("sampling", "Peak memory of generate at batch 8, length 1024, vocabulary 50,258",
         ["bench/sampling_speed.py", "--memory-only", "--length", "1024", "--batch", "8", "--budgets", "24",
          "--steps", "2", "8"]),
        ("compile", "torch.compile and generate: eager, regional (compile_repeated_blocks), whole backbone",
         ["bench/compile_speed.py"]),
    ]
    if trained:
        out.append(("solver", f"Solver convergence on the trained model `{trained}`",
                    ["bench/solver_convergence.py", "--model", trained, "--out", "bench/solver_convergence.png"]))
    return out


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trained", default=None, help="trained FP model folder for the solver benchmark")
    p.add_argument("--only", nargs="+", choices=["params", "speed", "train", "sampling", "compile", "solver"],
                   help="run a subset; an existing report keeps the other sections")
    p.add_argument("--out", default="bench/RESULTS.md", help="report path (written atomically)")
    args = p.parse_args(argv)
    trained = args.trained or next((c for c in CANDIDATES if (ROOT / c / "config.json").exists()), None)
    sections = [f"# Benchmark results\n\nWritten by `python bench/run_all.py` on "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\nMachine: {machine()}.\n\n"
                "Every ratio compares two models measured in the same process, with interleaved calls; absolute "
                "times depend on the machine and its load. On this project's shared 2-core VM the same timing "
                "ratio moved by up to ±30% between back-to-back runs of this script (for example 1.32 and 2.85 for "
                "the concat_mlp generation ratio, 0.79 and 1.05 for add), so read single timing ratios as "
                "±30%; parameter counts and block-pass counts are exact.\n"]
    failed = 0
    for key, title, cmd in benches(trained):
        if args.only and key not in args.only:
            continue
        print(f"[bench] {title}: python {' '.join(cmd)}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false"))
        secs = time.time() - t0
        body = proc.stdout.strip()
        if proc.returncode:
            body = f"FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        failed += proc.returncode != 0
        sections.append(f"## {title}\n\n`python {' '.join(cmd)}` ({secs:.0f} s)\n\n" + _fence(body) + "\n")
        if key == "solver" and proc.returncode == 0:
            sections.append("![solver convergence](solver_convergence.png)\n")
    out = ROOT / args.out
    if args.only and out.is_file():  # a partial run updates its own sections and keeps the others
        sections = _merge(out.read_text(), sections)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(sections))
    os.replace(tmp, out)
    print(f"[bench] wrote {out}" + (f" ({failed} failed)" if failed else ""))
    return 1 if failed else 0


def _merge(previous: str, fresh: list[str]) -> list[str]:
    """`fresh` (header first, then one string per `## ` section) with the sections of `previous` that it did not
    rerun kept in their place; the header (date, machine) is the fresh one."""
    def split(text):
        return {part.split("\n", 1)[0]: "## " + part for part in text.split("\n## ")[1:]}

    new = split("\n" + "\n".join(fresh[1:]))
    merged = [fresh[0]]
    for title, body in split(previous).items():
        merged.append(new.pop(title, body).rstrip("\n") + "\n")
    merged += [body.rstrip("\n") + "\n" for body in new.values()]
    return merged


def _fence(text: str) -> str:
    """Markdown tables stay as they are; everything else is shown verbatim."""
    lines = text.splitlines()
    if lines and all(line.startswith("|") for line in lines if line.strip()):
        return text
    return "```\n" + text + "\n```"


if __name__ == "__main__":
    sys.exit(main())
