"""Text generation with an FP-MGM in the transformers / Dream / LLaDA words: continue a prompt by
`max_new_tokens`, fill a gap before a fixed suffix, decode long outputs blockwise, and stream the drafts.

    .venv/bin/python examples/generate_text.py --model outputs/demo/fp-mdlm
    .venv/bin/python examples/generate_text.py --model DIR --prompt "ROMEO:" --suffix "the end." --max-new-tokens 16
    .venv/bin/python examples/generate_text.py --model DIR --max-new-tokens 2048 --block-length 128 --steps 16 --stream

`--budget` and `--steps` apply to each block (see docs/generation.md). Any save_pretrained folder with tokenizer
files works: it loads with the installed fpmgm_hf code, running nothing from the folder (the folder also
ships `pipeline("text-generation")` for `trust_remote_code=True` users).
"""

import argparse

import torch
from transformers import AutoTokenizer, TextDiffusionStreamer

from fpmgm_hf import FPMGMForMaskedGeneration


def build_canvas(tokenizer, prompt: str, suffix: str, gap: int) -> torch.Tensor:
    """(1, L): prompt ids, `gap` masks, then suffix ids: the masks are what `generate` fills."""
    if gap < 1:
        raise ValueError(f"--max-new-tokens {gap} leaves nothing to generate.")
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    return torch.tensor([head + [tokenizer.mask_token_id] * gap + tail])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="outputs/demo/fp-mdlm", help="save_pretrained folder (with tokenizer files)")
    p.add_argument("--prompt", default="ROMEO:\n", help="fixed text at the start")
    p.add_argument("--suffix", default="", help="fixed text at the end: the new tokens fill the gap (infilling)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate")
    p.add_argument("--budget", type=int, default=96, help="transformer-block passes per sample and block")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: from the budget)")
    p.add_argument("--block-length", type=int, default=None, help="decode in blocks of this many tokens (LLaDA)")
    p.add_argument("--reuse", default="3sr", choices=["3sr", "full", "none"], help="solver warm starts")
    p.add_argument("--samples", type=int, default=2, help="samples to draw (num_return_sequences)")
    p.add_argument("--stream", action="store_true", help="show the drafts while decoding (one sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    model = FPMGMForMaskedGeneration.from_pretrained(args.model).eval()  # the installed code, none from the folder
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.suffix:  # infilling: the canvas holds the masks between prompt and suffix
        inputs = dict(input_ids=build_canvas(tokenizer, args.prompt, args.suffix, args.max_new_tokens))
    else:  # continuation: generate appends the masks after the prompt
        inputs = dict(input_ids=tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"],
                      max_new_tokens=args.max_new_tokens)
    streamer = TextDiffusionStreamer(tokenizer) if args.stream and args.samples == 1 else None
    out = model.generate(
        **inputs,
        budget=args.budget,
        steps=args.steps,
        block_length=args.block_length,
        reuse=args.reuse,
        num_return_sequences=args.samples,
        streamer=streamer,
        generator=torch.Generator().manual_seed(args.seed),
        return_dict_in_generate=True,
    )
    for i, seq in enumerate(out.sequences):
        print(f"--- sample {i} ({int(out.block_passes[i])} block passes, {out.num_blocks} block(s) of "
              f"{out.num_steps} steps)")
        print(tokenizer.decode(seq))
    return out


if __name__ == "__main__":
    main()
