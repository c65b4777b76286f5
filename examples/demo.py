"""The main demo: build a small FP-MDLM, save it, reload it through `AutoModel(trust_remote_code=True)`
in a process where fpmgm_hf cannot be imported (as a Hub user would), run a forward pass and a budgeted
3SR generation, and print the solver statistics.

    bash scripts/demo.sh                      # set-up + this script
    .venv/bin/python examples/demo.py --out outputs/demo
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration

RELOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys, torch
    class _Block(importlib.abc.MetaPathFinder):  # prove the model code comes from the saved folder
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "fpmgm_hf":
                raise ImportError("fpmgm_hf is not importable here")
    sys.meta_path.insert(0, _Block())
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size - 1, (2, 32), generator=g)
    x[:, 8:24] = model.config.mask_token_id
    with torch.no_grad():
        out = model(x, fp_iters=8)
    res = model.generate(x, budget=48, num_steps=8, reuse="3sr", generator=g, return_dict_in_generate=True)
    print(json.dumps({
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "logits": list(out.logits.shape),
        "iterations": out.solver_stats.iterations.tolist(),
        "residual": [float(f"{r:.3g}") for r in out.solver_stats.residual.tolist()],
        "block_passes": out.block_passes.tolist(),
        "gen_block_passes": res.block_passes.tolist(), "gen_nfe": res.nfe.tolist(),
        "gen_iters_per_step": [s["fp_iters"] for s in res.step_stats],
        "masks_left": int((res.sequences == model.config.mask_token_id).sum()),
    }))
    """
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    config = FPMGMConfig(
        vocab_size=1025,
        mask_token_id=1024,
        hidden_size=128,
        num_attention_heads=4,
        cond_dim=64,
        max_position_embeddings=128,
        num_pre_layers=1,
        num_fp_layers=1,
        num_post_layers=1,
    )
    model = FPMGMForMaskedGeneration(config)
    model.save_pretrained(out / "model")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"saved a {n_params / 1e6:.2f}M-parameter FP-MDLM (1/1/1, concat_mlp) to {out / 'model'}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str((out / "hf_modules").resolve()))
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str((out / "model").resolve())],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode:
        sys.exit(f"remote-code reload failed:\n{proc.stderr}")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    print("reloaded through AutoModel(trust_remote_code=True) as", stats.pop("class"))
    for key, value in stats.items():
        print(f"  {key:20s} {value}")


if __name__ == "__main__":
    main()
