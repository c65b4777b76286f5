"""Quality vs compute: sample one model at several budgets and warm-start modes, score every batch.

    .venv/bin/python examples/budget_sweep.py --model outputs/demo/fp-mdlm
    .venv/bin/python examples/budget_sweep.py --model DIR --budgets 48 96 192 --reuse none 3sr --eval-lm gpt2-large

A budget is the number of transformer-block passes per sample; `generate(budget=...)` picks the step count and
spreads the fixed-point iterations over the steps. Samples are scored by an evaluation LM (generative
perplexity, lower is better) and by their unigram entropy (collapsed, repetitive text has low entropy).
Offline, the evaluation LM falls back to the bundled SmolLM2 (with a warning): those numbers rank samples but
are not on the published scale. For the full protocol (best step count per budget, plots, resumable),
use `fpmgm-eval sweep`.
"""

import argparse

import torch
from transformers import AutoTokenizer

from fpmgm_hf import FPMGMForMaskedGeneration
from fpmgm_hf.evaluation import generate_samples, score
from fpmgm_hf.evaluation.metrics import load_eval_lm


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="outputs/demo/fp-mdlm", help="save_pretrained folder (with tokenizer files)")
    p.add_argument("--budgets", type=int, nargs="+", default=[48, 96, 192], help="block passes per sample")
    p.add_argument("--reuse", nargs="+", default=["none", "3sr"], choices=["none", "full", "3sr"],
                   help="solver warm starts to compare (explicit stacks only use 'none')")
    p.add_argument("--samples", type=int, default=8, help="samples per point")
    p.add_argument("--length", type=int, default=64, help="tokens per sample")
    p.add_argument("--eval-lm", default="gpt2-large", help="Hub id or local folder of a causal LM")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every point)")
    args = p.parse_args(argv)

    model = FPMGMForMaskedGeneration.from_pretrained(args.model).eval()  # the installed code, none from the folder
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eval_lm, eval_tok, info = load_eval_lm(args.eval_lm)
    reuse_modes = args.reuse if model.config.num_fp_layers else ["none"]
    print(f"evaluation LM: {info['name']} (comparable to published numbers: {info['comparable_to_published']})")
    print("| budget | reuse | block passes | gen PPL | entropy |\n|---|---|---|---|---|")
    rows = []
    for budget in args.budgets:
        for reuse in reuse_modes:
            seqs, passes = generate_samples(model, args.samples, args.length, args.samples, args.seed,
                                            budget=budget, reuse=reuse)
            s = score(seqs, tokenizer, eval_lm, eval_tok)
            rows.append({"budget": budget, "reuse": reuse, "block_passes": passes, **s})
            print(f"| {budget} | {reuse} | {passes:.0f} | {s['gen_ppl']:.1f} | {s['entropy']:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
