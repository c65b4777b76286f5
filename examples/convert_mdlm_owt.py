"""Convert the real `kuleshov-group/mdlm-owt` into a CoFRe FP-MDLM on a GPU machine (the paper's §4.2 recipe).

    accelerate launch --mixed_precision bf16 examples/convert_mdlm_owt.py --output outputs/fp-mdlm-owt
    accelerate launch --num_processes 8 --mixed_precision bf16 examples/convert_mdlm_owt.py \
        --push-to-hub you/fp-mdlm-owt

Settings (paper §3.4 / App. C.3): layers 1, 6, 12 -> 1/1/1 with the concat-MLP injection near the identity,
40k distillation steps against the frozen MDLM (lambda 0.1, tau 1.5), OpenWebText blocks of 1024 tokens,
global batch 512 (the gradient accumulation is derived from the number of processes), then a short CoFRe
consistency stage (early stop at a 15% validation-PPL rise); the output samples with 3SR. Expect about a day
on one H100 (conversion/README.md has the estimate). Preempted? Run the same command again: it resumes
from the newest checkpoint. Any other `conversion/convert.py` flag can be appended.
"""

import argparse
import importlib.util
from pathlib import Path

CONVERT = Path(__file__).resolve().parents[1] / "conversion" / "convert.py"


def load_converter():
    spec = importlib.util.spec_from_file_location("fpmgm_convert", CONVERT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    from accelerate import PartialState

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mdlm", default="kuleshov-group/mdlm-owt", help="Hub id, folder, .safetensors or .ckpt")
    p.add_argument("--tokenizer", default="gpt2", help="tokenizer of the checkpoint")
    p.add_argument("--map", default="1,6,12", help="MDLM layers of the pre, shared and post blocks (paper: 1,6,12)")
    p.add_argument("--data", default="openwebtext", help="Hub dataset (streamed) or local text files")
    p.add_argument("--output", default="outputs/fp-mdlm-owt", help="output folder (written atomically)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per block")
    p.add_argument("--steps", type=int, default=40000, help="distillation steps (paper: 40k)")
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch per process")
    p.add_argument("--global-batch", type=int, default=512, help="blocks per optimizer step over all processes")
    p.add_argument("--consistency-steps", type=int, default=3000, help="CoFRe stage steps (0 = none)")
    p.add_argument("--max-train-blocks", type=int, default=1_000_000, help="blocks held in memory")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the result")
    args, extra = p.parse_known_args(argv)
    procs = PartialState().num_processes
    if args.global_batch % (args.batch_size * procs):
        raise ValueError(f"--global-batch {args.global_batch} must be a multiple of --batch-size x processes "
                         f"= {args.batch_size} x {procs}.")
    convert = load_converter()
    cli = ["--mdlm", args.mdlm, "--tokenizer", args.tokenizer, "--map", args.map, "--layers", "1/1/1",
           "--data", args.data, "--seq-len", str(args.seq_len), "--max-train-blocks", str(args.max_train_blocks),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--grad-accum", str(args.global_batch // (args.batch_size * procs)),
           "--kl-weight", "0.1", "--kl-warmup", str(min(5000, args.steps // 8 or 1)), "--tau", "1.5", "--lr", "2e-4",
           "--save-every", str(max(1, min(1000, args.steps // 4))),
           "--eval-every", str(max(1, min(500, args.steps // 4))),
           "--output", args.output]
    if args.consistency_steps:
        cli += ["--consistency-weight", "0.1", "--consistency-warmup", str(max(1, args.consistency_steps // 6)),
                "--consistency-steps", str(args.consistency_steps), "--stop-ppl-rise", "0.15"]
    if args.push_to_hub:
        cli += ["--push-to-hub", args.push_to_hub]
    cli += ["--resume", "latest"]  # preempted? the same command continues from the last checkpoint
    return convert.main(cli + extra)


if __name__ == "__main__":
    main()
