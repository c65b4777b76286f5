"""Which conversion recipe pays? MDLM -> FP-MDLM 1/1/1 recipes at equal fine-tuning steps, each with its distance
from the teacher right after mapping and after fine-tuning (issue 28; docs/conversion).

    .venv/bin/python bench/convert_study.py --teacher outputs/repro/mdlm/final
    .venv/bin/python bench/convert_study.py ... --rows auto paper --steps 20 --out /tmp/c      # toy

Every row is one `conversion/convert.py` call (resumable, `--resume latest`) on the teacher's own data, framing and
held-out split (read from its training_data.json), with `--dry-run` first for the distance at start. Distances, on
the teacher's held-out blocks with the same masks for every model: held-out NELBO (nats/char) at 1 and 8 iterations,
and KL(teacher || student) over masked positions (mask rate 0.5) at 1 and 8 iterations. The layer CKA of the
teacher is published with the table (cka.png, and the consecutive-layer values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# name -> (--map, extra converter flags, description). "auto": the paper's rule on the layer CKA (the first layer
# after the largest consecutive-CKA drop); "paper": the paper's 1,6,12 (the middle layer of 12).
ROWS = {
    "auto": ("auto", [], "--map auto (CKA), KL distillation (the paper's §3.4 loss)"),
    "paper": ("1,6,12", [], "--map 1,6,12 (the paper's mapping), KL distillation"),
    "late": ("1,11,12", [], "--map 1,11,12 (a late layer as the shared block), KL distillation"),
    "auto+cons": ("auto", ["--consistency-weight", "0.1"], "--map auto, KL + L_CONS in the same stage"),
    "auto+hidden": ("auto", ["--hidden-weight", "1.0"],
                    "--map auto, KL + the teacher's hidden state at the post block's input"),
    "auto@1e-3": ("auto", ["--lr", "1e-3"], "--map auto, KL distillation at lr 1e-3 (default 2e-4)"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--teacher", required=True, help="the MDLM folder (trained by fpmgm-train, with its training_data.json)")
    a("--out", default="outputs/convert-study", help="working folder; re-runs resume")
    a("--docs", default="docs/conversion", help="where README.md, results.json and cka.png go ('' = nowhere)")
    a("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    a("--steps", type=int, default=500, help="fine-tuning steps of every row (<= 10%% of the teacher's)")
    a("--batch", type=int, default=32)
    a("--eval-blocks", type=int, default=256, help="held-out blocks of the distance measurements")
    a("--threads", type=int, default=1)
    a("--seed", type=int, default=0)
    return p.parse_args(argv)


def convert_cmd(args, row: str, out: Path, dry: bool) -> list[str]:
    mapping, extra, _ = ROWS[row]
    cmd = [sys.executable, str(ROOT / "conversion" / "convert.py"), "--mdlm", args.teacher, "--map", mapping,
           "--layers", "1/1/1", "--data", args.data, "--batch-size", str(args.batch), "--seed", str(args.seed),
           "--output", str(out)]
    if dry:
        return cmd + ["--dry-run"]
    return cmd + ["--steps", str(args.steps), "--kl-warmup", str(max(1, args.steps // 5)),
                  "--consistency-warmup", str(max(1, args.steps // 5)), "--eval-every", str(max(50, args.steps // 5)),
                  "--save-every", str(max(50, args.steps // 5)), "--log-every", "0", "--resume", "latest",
                  "--work-dir", str(out) + ".work", *extra]


def run(cmd: list[str], log: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return time.time() - t0


@torch.no_grad()
def distance(student_dir: Path, teacher, val: torch.Tensor, seed: int) -> dict:
    """Held-out NELBO at 1 and 8 iterations and KL(teacher || student) at 1 and 8 iterations (mask rate 0.5)."""
    from fpmgm_hf import FPMGMForMaskedGeneration
    from fpmgm_hf.evaluation.depth import logit_kl_by_iters, nelbo_by_iters

    student = FPMGMForMaskedGeneration.from_pretrained(student_dir).eval()
    nelbo = nelbo_by_iters(student, val, (1, 8), draws=1, seed=seed)
    kl = logit_kl_by_iters(student, val[:64], (1, 8), rates=(0.5,), reference=teacher, seed=seed)[0.5]
    return {"nelbo": {str(k): v for k, v in nelbo.items()}, "kl": {str(k): v for k, v in kl.items()}}


def measure_row(args, row: str, out: Path, teacher, val) -> dict:
    path = out / f"{row}.json"
    if path.is_file():
        return json.loads(path.read_text())
    start_dir, final_dir = out / f"{row}-start", out / row
    seconds = 0.0
    if not (start_dir / "config.json").is_file():
        run(convert_cmd(args, row, start_dir, dry=True), out / f"{row}.log", args.threads)
    if not (final_dir / "config.json").is_file():
        seconds = run(convert_cmd(args, row, final_dir, dry=False), out / f"{row}.log", args.threads)
    report = json.loads((final_dir / "conversion.json").read_text())
    result = {"row": row, "description": ROWS[row][2], "mapping": report["mapping"], "steps": args.steps,
              "seconds": seconds, "start": distance(start_dir, teacher, val, args.seed),
              "after": distance(final_dir, teacher, val, args.seed)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return result


def table(results: list[dict], teacher_nelbo: float) -> str:
    lines = [f"Teacher held-out NELBO: {teacher_nelbo:.4f} nats/char.", "",
             "| recipe | map | NELBO @1 / @8 at start | KL @1 / @8 at start | NELBO @1 / @8 after | KL @1 / @8 after "
             "| after @8 vs teacher |", "|---|---|---|---|---|---|---|"]
    for r in results:
        s, a = r["start"], r["after"]
        lines.append(f"| {r['description']} | {','.join(map(str, r['mapping']))} "
                     f"| {s['nelbo']['1']:.3f} / {s['nelbo']['8']:.3f} | {s['kl']['1']:.3f} / {s['kl']['8']:.3f} "
                     f"| {a['nelbo']['1']:.3f} / {a['nelbo']['8']:.3f} | {a['kl']['1']:.3f} / {a['kl']['8']:.3f} "
                     f"| {100 * (a['nelbo']['8'] / teacher_nelbo - 1):+.1f}% |")
    return "\n".join(lines)


def teacher_cka(teacher, val, seed: int) -> torch.Tensor:
    from fpmgm_hf.conversion.convert import cka_mapping

    cka, _ = cka_mapping(teacher, val[:8], 1, 1, 1, seed)
    return cka


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from fpmgm_hf import FPMGMForMaskedGeneration
    from fpmgm_hf.conversion.layer_mapping import save_cka_png
    from fpmgm_hf.data import load_blocks, load_training_tokenizer, read_data_record, split_blocks
    from fpmgm_hf.evaluation.depth import nelbo_by_iters

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    record = read_data_record(args.teacher)
    if record is None:
        raise SystemExit(f"--teacher {args.teacher}: no training_data.json (train it with fpmgm-train)")
    args.data = record["data"]
    tok = load_training_tokenizer(args.teacher)
    blocks = load_blocks(record["data"], tok, record["seq_len"], wrap=record["wrap"])
    _, val = split_blocks(blocks, record["val_fraction"])
    val = val[: args.eval_blocks]
    teacher = FPMGMForMaskedGeneration.from_pretrained(args.teacher).eval()
    teacher_nelbo = nelbo_by_iters(teacher, val, (1,), draws=1, seed=args.seed)[1]
    results = [measure_row(args, row, out, teacher, val) for row in args.rows]
    cka = teacher_cka(teacher, val, args.seed)
    consecutive = [round(float(cka[i, i + 1]), 3) for i in range(cka.shape[0] - 1)]
    print(table(results, teacher_nelbo))
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        save_cka_png(cka, docs / "cka.png", title="teacher layer CKA")
        payload = {"teacher_nelbo": teacher_nelbo, "consecutive_cka": consecutive, "rows": results,
                   "steps": args.steps, "eval_blocks": int(val.shape[0])}
        (docs / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
        body = ["# Conversion recipes at equal fine-tuning steps", "",
                f"Written by `python bench/convert_study.py --steps {args.steps}`: "
                f"{teacher.config.num_pre_layers}-block MDLM teacher -> FP-MDLM 1/1/1, {args.steps} fine-tuning "
                f"steps per recipe (batch {args.batch}), the teacher's data, framing and held-out split; "
                f"distances on {val.shape[0]} held-out blocks, the same "
                "masks for every model. 'at start': right after mapping (`--dry-run`).", "",
                table(results, teacher_nelbo), "",
                f"Teacher layer CKA (consecutive layers): {', '.join(map(str, consecutive))} "
                "(the paper's MDLM-OWT: 0.16 between layers 5 and 6, then a 0.998 plateau). ![CKA](cka.png)"]
        if (docs / "findings.md").is_file():
            body += ["", (docs / "findings.md").read_text()]
        (docs / "README.md").write_text("\n".join(body) + "\n")
    return results


if __name__ == "__main__":
    main()
