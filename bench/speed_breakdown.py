"""Where FP-MDLM's per-pass overhead goes: MDLM 12/0/0 against FP-MDLM 1/1/1 (default map) with no reuse, with
3SR, and with 3SR and the safety net off, interleaved in one process; prints each median and its ratio to MDLM.

    .venv/bin/python bench/speed_breakdown.py            # about a minute on 2 idle CPU cores

Run it on an otherwise idle machine: only ratios within one run compare.
"""

from types import SimpleNamespace

import torch
from generate_speed import timed_pair  # the same interleaved, rotated timing as bench/generate_speed.py

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration

BASE = dict(vocab_size=1024, mask_token_id=1023, hidden_size=256, num_attention_heads=4, cond_dim=128,
            max_position_embeddings=128, dropout=0.0)
COMMON = dict(budget=96, num_steps=8, sampler="ancestral", use_cache=False)


def main(repeats: int = 7) -> None:
    torch.manual_seed(0)
    fp = FPMGMForMaskedGeneration(FPMGMConfig(**BASE, num_pre_layers=1, num_fp_layers=1, num_post_layers=1)).eval()
    strict = FPMGMForMaskedGeneration(FPMGMConfig(**BASE, num_pre_layers=1, num_fp_layers=1, num_post_layers=1,
                                                  fp_divergence_patience=None)).eval()
    strict.load_state_dict(fp.state_dict())
    mdlm = FPMGMForMaskedGeneration(FPMGMConfig(**BASE, num_pre_layers=12, num_fp_layers=0,
                                                num_post_layers=0)).eval()
    cases = {"MDLM 12/0/0": (mdlm, {}), "FP-MDLM, no reuse": (fp, {"reuse": "none"}),
             "FP-MDLM, 3SR": (fp, {"reuse": "3sr"}), "FP-MDLM, 3SR, safety net off": (strict, {"reuse": "3sr"})}
    medians, _ = timed_pair([m for m, _ in cases.values()], SimpleNamespace(batch=8, length=128), repeats,
                            [dict(COMMON, **kw) for _, kw in cases.values()])
    base = medians[0]
    print(f"width 256, length 128, batch 8, budget 96 = 8 steps, median of {repeats}, torch threads "
          f"{torch.get_num_threads()}")
    print("| setting | s per generate | ratio to MDLM |\n|---|---|---|")
    for name, median in zip(cases, medians, strict=True):
        print(f"| {name} | {median:.3f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
