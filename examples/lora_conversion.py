"""Convert an MDLM into an FP-MDLM with LoRA adapters instead of full fine-tuning, then compare the cost.

    .venv/bin/python examples/lora_conversion.py      # the MDLM of the demo (run bash scripts/demo.sh first)
    .venv/bin/python examples/lora_conversion.py --mdlm kuleshov-group/mdlm-owt --tokenizer gpt2 --data openwebtext

Runs `accelerate launch conversion/convert.py --lora-r R`: rank-R adapters on every Linear of the three
blocks (the injection is trained in full because it starts from the identity), merged into the weights
before saving, so the output is a plain FP-MDLM folder. Prints trainable vs total parameters and the
validation NELBO of the teacher and of the converted model. Extra convert.py flags can be appended.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mdlm", default="outputs/demo/mdlm/final", help="MDLM checkpoint (folder, file or Hub id)")
    p.add_argument("--tokenizer", default="outputs/demo/tokenizer", help="its tokenizer")
    p.add_argument("--data", default="shakespeare", help="fine-tuning text")
    p.add_argument("--map", default="1,3,6", help="MDLM layers for the pre / shared / post blocks")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per block")
    p.add_argument("--output", default="outputs/lora-conversion", help="output folder")
    p.add_argument("--launcher", choices=["accelerate", "python"], default="accelerate",
                   help="run convert.py under `accelerate launch` or plain python")
    args, extra = p.parse_known_args(argv)
    if not Path(args.mdlm).exists() and args.mdlm.startswith("outputs/"):
        raise SystemExit(f"--mdlm {args.mdlm} does not exist: run `bash scripts/demo.sh` first or pass a checkpoint.")
    accelerate = str(Path(sys.executable).with_name("accelerate"))  # the one of this environment
    exe = [accelerate, "launch", "--num_processes", "1"] if args.launcher == "accelerate" else [sys.executable]
    cmd = exe + [str(ROOT / "conversion" / "convert.py"), "--mdlm", args.mdlm, "--tokenizer", args.tokenizer,
                 "--data", args.data, "--map", args.map, "--layers", "1/1/1", "--lora-r", str(args.rank),
                 "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                 "--kl-warmup", str(max(1, args.steps // 5)),
                 "--output", args.output, "--overwrite", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    report = json.loads((Path(args.output) / "conversion.json").read_text())
    params = report["finetune"]["parameters"]
    print(f"trainable {params['trainable_parameters']:,} of {params['total_parameters']:,} parameters "
          f"({100 * params['trainable_parameters'] / params['total_parameters']:.1f}%)")
    before, after = report["verify_before"], report["verify_after"]
    print(f"validation NELBO: teacher {before['teacher_nelbo']:.3f}, converted {before['converted_nelbo']:.3f} "
          f"before fine-tuning -> {after['converted_nelbo']:.3f} after")
    return report


if __name__ == "__main__":
    main()
