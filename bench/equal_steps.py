"""Does the fixed point sample better than one iteration? FP-MDLM at an equal step count (T=32): one iteration per
step from h_pre and from the 3SR start (budget 96), against converged solves (tolerance 1e-4, budget 1024) with no
reuse and with 3SR. 128 samples each, scored by the reproduction's in-domain character LM (gen-PPL with its 95%
bootstrap interval, unigram entropy).

    python bench/equal_steps.py outputs/repro/fp/final docs/reproduction/equal_steps_fp.json
"""

from __future__ import annotations

import argparse
import json

import torch

from fpmgm_hf import FPMGMForMaskedGeneration
from fpmgm_hf.data import load_training_tokenizer
from fpmgm_hf.evaluation.metrics import load_eval_lm
from fpmgm_hf.evaluation.sweep import generate_samples, score

ROWS = {  # name -> generate kwargs at 32 steps
    "1 iter, none": dict(budget=96, reuse="none"),
    "1 iter, 3sr": dict(budget=96, reuse="3sr"),
    "converged, none": dict(budget=32 * 32, reuse="none", fp_tol=1e-4),
    "converged, 3sr": dict(budget=32 * 32, reuse="3sr", fp_tol=1e-4),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--eval-lm", default="outputs/repro/char-lm/final")
    p.add_argument("--samples", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = FPMGMForMaskedGeneration.from_pretrained(args.model).eval()
    tok = load_training_tokenizer(args.model)
    lm, lm_tok, _ = load_eval_lm(args.eval_lm, offline_fallback=False)
    rows = {}
    for name, kwargs in ROWS.items():
        seqs, passes = generate_samples(model, args.samples, 128, 64, 0, num_steps=32, **kwargs)
        s = score(seqs, tok, lm, lm_tok, batch_size=32)
        rows[name] = {"gen_ppl": s["gen_ppl"], "ci95": s["ci95"], "entropy": s["entropy"], "block_passes": passes}
        print(name, json.dumps(rows[name]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
