"""Wall time of `generate` per transformer-block pass: FP-MDLM (1/1/1) against the explicit stack of the
same width (12/0/0, the MDLM baseline), at the same budget and number of steps, in the same run. A second,
identical MDLM is timed in the same rotation: its ratio to the first (A/A) is this run's noise floor.

    python bench/generate_speed.py                    # defaults: width 256, length 128, batch 8, budget 96
    python bench/generate_speed.py --hidden 768 --heads 12 --length 256 --budgets 96 192

Also reports what the ancestral cache and adaptive stopping save (block passes run vs budget).
Random-weight models: timings do not depend on the weights, but cache and stopping savings do, so
they are indicative only here (bench/RESULTS.md has them on trained models).
"""

import argparse
import statistics
import time

import torch

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration


def build(args, seed=0, **layers):
    torch.manual_seed(seed)
    config = FPMGMConfig(
        vocab_size=args.vocab,
        mask_token_id=args.vocab - 1,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        cond_dim=64,
        max_position_embeddings=args.length,
        dropout=0.0,
        **layers,
    )
    return FPMGMForMaskedGeneration(config).eval()


def timed_pair(models, args, repeats, kwargs):
    """Median seconds of one generate call per model, calls interleaved so that a change in machine load hits
    all alike, and the order rotated each round (A B C, B C A, C A B, ...) because the position in a round
    alone moves a timing by a few percent here; the first round warms up. Returns (times, outputs)."""
    times, outs = [[] for _ in models], [None] * len(models)
    for r in range(repeats + 1):
        for j in range(len(models)):
            i = (j + r) % len(models)
            model, kw = models[i], kwargs[i]
            g = torch.Generator().manual_seed(r)
            t0 = time.perf_counter()
            outs[i] = model.generate(
                batch_size=args.batch, seq_len=args.length, generator=g, return_dict_in_generate=True, **kw
            )
            if r:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) if t else float("nan") for t in times], outs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256, help="width of both models")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--length", type=int, default=128, help="canvas length")
    p.add_argument("--batch", type=int, default=8, help="samples per generate call")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (mask included)")
    p.add_argument("--budgets", type=int, nargs="+", default=[96], help="block-pass budgets")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per setting (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--no-savings", action="store_true", help="skip the cache / adaptive-stopping section")
    p.add_argument(
        "--injection",
        default="constrained",
        choices=["constrained", "concat_mlp", "add", "none"],
        help="FP-MDLM input injection (default constrained: elementwise; concat_mlp adds 4*D^2 multiply-adds "
        "per token and iteration)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mdlm = build(args, num_pre_layers=12, num_fp_layers=0, num_post_layers=0)
    fp = build(args, num_pre_layers=1, num_fp_layers=1, num_post_layers=1, injection=args.injection)
    print(
        f"width {args.hidden}, length {args.length}, batch {args.batch}, vocab {args.vocab}, "
        f"torch threads {torch.get_num_threads()}"
    )
    twin = build(args, seed=1, num_pre_layers=12, num_fp_layers=0, num_post_layers=0)
    print("| budget | steps | MDLM s | FP-MDLM s | MDLM s/pass | FP s/pass | ratio (FP/MDLM per pass) "
          "| A/A (MDLM twin/MDLM) |")
    print("|---|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        steps = budget // 12
        common = dict(budget=budget, num_steps=steps, sampler="ancestral", use_cache=False)
        (t_m, t_f, t_t), (o_m, o_f, o_t) = timed_pair(
            [mdlm, fp, twin], args, args.repeats, [common, dict(common, reuse="3sr"), common]
        )
        per_m, per_f, per_t = (t / o.block_passes.float().mean().item() for t, o in [(t_m, o_m), (t_f, o_f),
                                                                                      (t_t, o_t)])
        print(
            f"| {budget} | {steps} | {t_m:.3f} | {t_f:.3f} | {per_m * 1e3:.2f} ms | {per_f * 1e3:.2f} ms | "
            f"{per_f / per_m:.3f} | {per_t / per_m:.3f} |"
        )
    if args.no_savings:
        return
    budget = args.budgets[-1]
    print(f"\nsavings at budget {budget} (block passes actually run, mean over the batch):")
    for name, model, kw in [
        ("MDLM, 64 steps, cache off", mdlm, dict(budget=768, use_cache=False)),
        ("MDLM, 64 steps, cache on", mdlm, dict(budget=768, use_cache=True)),
        ("FP-MDLM, cache on", fp, dict(budget=budget, num_steps=budget // 12, use_cache=True)),
        ("FP-MDLM, cache on, fp_tol=1e-2", fp, dict(budget=budget, num_steps=budget // 12, fp_tol=1e-2)),
    ]:
        _, (out,) = timed_pair([model], args, 0, [kw])
        used = out.block_passes.float().mean().item()
        print(
            f"  {name:32s} {used:7.1f} of {kw['budget']} ({100 * (1 - used / kw['budget']):.1f}% saved), "
            f"nfe {out.nfe.float().mean().item():.1f}"
        )


if __name__ == "__main__":
    main()
