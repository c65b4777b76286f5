"""Text generation with an FP-MGM: continue a prompt, and fill a gap between two fixed spans (infilling).

    .venv/bin/python examples/generate_text.py --model outputs/demo/fp-mdlm
    .venv/bin/python examples/generate_text.py --model DIR --prompt "ROMEO:" --suffix "the end." --budget 96

The canvas is just token ids: the prompt and suffix stay fixed, `mask_token_id` marks what to generate.
Any save_pretrained folder with tokenizer files works (it loads through trust_remote_code).
"""

import argparse

import torch
from transformers import AutoModel, AutoTokenizer


def build_canvas(tokenizer, prompt: str, suffix: str, length: int) -> torch.Tensor:
    """(1, length): prompt ids, then masks, then suffix ids (if any)."""
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    if len(head) + len(tail) >= length:
        raise ValueError(f"--length {length} leaves no room to generate after {len(head) + len(tail)} fixed tokens.")
    gap = length - len(head) - len(tail)
    return torch.tensor([head + [tokenizer.mask_token_id] * gap + tail])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="outputs/demo/fp-mdlm", help="save_pretrained folder (with tokenizer files)")
    p.add_argument("--prompt", default="ROMEO:\n", help="fixed text at the start")
    p.add_argument("--suffix", default="", help="fixed text at the end (infilling when given)")
    p.add_argument("--length", type=int, default=64, help="canvas length in tokens")
    p.add_argument("--budget", type=int, default=96, help="transformer-block passes per sample")
    p.add_argument("--reuse", default="3sr", choices=["3sr", "full", "none"], help="solver warm starts")
    p.add_argument("--samples", type=int, default=2, help="samples to draw")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    canvas = build_canvas(tokenizer, args.prompt, args.suffix, args.length).repeat(args.samples, 1)
    out = model.generate(
        canvas,
        budget=args.budget,
        reuse=args.reuse,
        generator=torch.Generator().manual_seed(args.seed),
        return_dict_in_generate=True,
    )
    for i, seq in enumerate(out.sequences):
        print(f"--- sample {i} ({int(out.block_passes[i])} block passes, {out.num_steps} steps)")
        print(tokenizer.decode(seq))
    return out


if __name__ == "__main__":
    main()
