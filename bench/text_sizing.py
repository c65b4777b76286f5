"""How big should the text models be for this machine? Short MDLM runs of a few width / depth shapes on
character-level Shakespeare, compared by held-out NELBO against wall-clock time, all in one process.

    .venv/bin/python bench/text_sizing.py --steps 800 --threads 1 --out docs/reproduction/sizing

Each shape trains `--steps` steps (batch 32 x 128 characters, AdamW lr 1e-3, warm-up 100) and reports the
validation NELBO every `--eval-every` steps with the elapsed seconds and its throughput; the shapes run one
after the other with the same threads. The table extrapolates each shape's time for the reproduction's token
budget; the plot shows NELBO against seconds.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp_stability import val_nelbo  # noqa: E402

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration  # noqa: E402
from fpmgm_hf.data import load_texts, pack_blocks, split_blocks, train_char_tokenizer  # noqa: E402
from fpmgm_hf.training.objectives import mdlm_nelbo  # noqa: E402

SHAPES = {"128x8": (128, 8), "192x6": (192, 6), "256x4": (256, 4), "128x12": (128, 12)}


def run_shape(name, args, tok, train, val) -> dict:
    hidden, layers = SHAPES[name]
    torch.manual_seed(args.seed)
    model = FPMGMForMaskedGeneration(FPMGMConfig(
        vocab_size=len(tok), mask_token_id=tok.mask_token_id, hidden_size=hidden, num_attention_heads=4,
        cond_dim=hidden // 2, max_position_embeddings=128, dropout=0.0, num_pre_layers=layers, num_fp_layers=0,
        num_post_layers=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    curve, spent = [], 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        model.train()
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, step / 100)
        loss, _ = mdlm_nelbo(model, train[torch.randint(0, train.shape[0], (32,), generator=g)], generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        spent += time.perf_counter() - t0
        if step % args.eval_every == 0:
            curve.append({"step": step, "seconds": round(spent, 1),
                          "val_nelbo": val_nelbo(model, val, argparse.Namespace(val_batches=8, batch=32))})
            print(f"[sizing] {name} {curve[-1]}", flush=True)
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = args.steps * 32 * 128 / spent
    return {"shape": name, "hidden": hidden, "layers": layers, "params": params, "tokens_per_s": tokens_per_s,
            "curve": curve}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["128x8", "192x6", "256x4"], choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-tokens", type=float, default=28.7e6, help="the reproduction's pretraining tokens")
    p.add_argument("--out", default="outputs/sizing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = load_texts("shakespeare")
    tok = train_char_tokenizer(texts)
    train, val = split_blocks(pack_blocks(texts, tok, 128), 0.05)
    results = []
    for name in args.shapes:
        path = out / f"{name}.json"
        if not path.is_file():
            path.write_text(json.dumps(run_shape(name, args, tok, train, val), indent=1))
        results.append(json.loads(path.read_text()))
    lines = [f"Command: `python bench/text_sizing.py {' '.join(sys.argv[1:])}`", "",
             "| shape (width x layers) | parameters | tokens / s | val NELBO at step "
             + " / ".join(str(c["step"]) for c in results[0]["curve"][:: max(1, len(results[0]["curve"]) // 4)])
             + f" | hours for {args.budget_tokens / 1e6:.1f}M tokens |", "|---|---|---|---|---|"]
    for r in results:
        pts = r["curve"][:: max(1, len(r["curve"]) // 4)]
        lines.append(f"| {r['shape']} | {r['params']:,} | {r['tokens_per_s']:.0f} | "
                     + " / ".join(f"{c['val_nelbo']:.3f}" for c in pts)
                     + f" | {args.budget_tokens / r['tokens_per_s'] / 3600:.2f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    _plot(results, out / "nelbo_vs_seconds.png")
    print("\n".join(lines))


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([c["seconds"] for c in r["curve"]], [c["val_nelbo"] for c in r["curve"]], marker="o",
                label=f"{r['shape']} ({r['params'] / 1e6:.1f}M)")
    ax.set_xlabel("training seconds (same threads, same process)")
    ax.set_ylabel("validation NELBO (nats / char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
