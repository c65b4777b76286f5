"""Train an FP-MDLM on your own text: a byte-level BPE fitted to the text, then the CoFRe training loop.

    .venv/bin/python examples/train_own_text.py --text my_corpus.txt --out outputs/my-fp-mdlm
    .venv/bin/python examples/train_own_text.py            # the bundled KJV Bible, ~10 min on 2 CPU cores

Steps: fit a tokenizer on `--text` (a .txt/.jsonl file or a bundled corpus name) -> pretrain FP-MDLM 1/1/1
with S-JFB (`fpmgm_hf.training.train`) -> a short consistency stage (lambda ramp, early stop on a validation-PPL rise)
-> `OUT/cofre/final`, a save_pretrained folder set up for 3SR sampling. Every stage resumes: re-run the same
command after an interruption. For GPUs or several processes, run the printed `fpmgm-train` commands under
`accelerate launch`.
"""

import argparse
import json
from pathlib import Path

from fpmgm_hf.data import BUNDLED_CORPORA, load_texts, train_bpe_tokenizer
from fpmgm_hf.training import train


def fit_tokenizer(text: str, vocab_size: int, out: Path) -> Path:
    folder = out / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        train_bpe_tokenizer(load_texts(text), vocab_size, str(folder))
    return folder


def stage(argv: list[str], out: Path) -> Path:
    """Run one fpmgm-train stage unless it finished; resume it if it was interrupted."""
    if (out / "final" / "config.json").exists():
        return out / "final"
    argv += ["--resume", "latest"]  # continues from a checkpoint when there is one
    print("fpmgm-train " + " ".join(argv), flush=True)
    return Path(train.main(argv))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="kjv", help=f"text file (.txt/.jsonl) or bundled corpus {list(BUNDLED_CORPORA)}")
    p.add_argument("--out", default="outputs/own-text", help="output folder (re-runs resume)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (mask token included)")
    p.add_argument("--hidden-size", type=int, default=256, help="model width")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training block")
    p.add_argument("--steps", type=int, default=800, help="pretraining steps")
    p.add_argument("--cons-steps", type=int, default=200, help="consistency-stage steps (0 skips the stage)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per step")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = fit_tokenizer(args.text, args.vocab_size, out)
    arch = {"hidden_size": args.hidden_size, "num_attention_heads": max(1, args.hidden_size // 64),
            "cond_dim": 128, "dropout": 0.0, "max_position_embeddings": args.seq_len}
    (out / "arch.json").write_text(json.dumps(arch))
    common = ["--data", args.text, "--tokenizer", str(tok), "--seq-len", str(args.seq_len), "--batch-size",
              str(args.batch_size), "--seed", str(args.seed), "--eval-every", str(max(10, args.steps // 4)),
              "--save-every", str(max(10, args.steps // 8))]
    model = stage(common + ["--config", str(out / "arch.json"), "--max-steps", str(args.steps),
                            "--warmup-steps", str(min(100, args.steps // 10)), "--out", str(out / "fp")], out / "fp")
    if args.cons_steps:
        model = stage(common + ["--from", str(model), "--max-steps", str(args.cons_steps), "--warmup-steps", "0",
                                "--consistency-weight", "0.1",
                                "--consistency-warmup", str(max(1, args.cons_steps // 5)),
                                "--stop-ppl-rise", "0.15", "--out", str(out / "cofre")], out / "cofre")
    print(f"done: {model}\n  sample it: .venv/bin/python examples/generate_text.py --model {model}")
    return model


if __name__ == "__main__":
    main()
