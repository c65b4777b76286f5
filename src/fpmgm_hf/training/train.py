"""Train an MDLM or FP-MDLM text model with Accelerate, and run the CoFRe consistency stage.

    fpmgm-train --data shakespeare --preset fp-mdlm-tiny --seq-len 128 --max-steps 2000 --out runs/fp
    accelerate launch --num_processes 2 -m fpmgm_hf.training.train --data corpus.jsonl --preset mdlm-small --out runs/m
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m fpmgm_hf.training.train ...   # 2 CPU processes
    fpmgm-train --from runs/fp/final --data shakespeare --consistency-weight 0.1 --consistency-warmup 500 \
        --stop-ppl-rise 0.15 --max-steps 3000 --out runs/fp-cofre

The loop (`fpmgm_hf.training.loop`) is shared with image training and the converter: checkpoints
`OUT/checkpoints/step_N` (Accelerate state, trainer state, EMA and random states as safetensors, a checksums
manifest; `--save-total-limit` rotates them), exact `--resume` (`latest`: continue if there is a checkpoint),
trackers through Accelerate (`OUT/log.jsonl` always, `--report-to` for tensorboard / wandb / ...), LoRA
(`--lora-r`, `--keep-adapter`). The export `OUT/final` is a Hub-ready `save_pretrained` folder with the
tokenizer and a model card; `--push-to-hub REPO_ID` uploads it. One run per `--out`: a second one refuses while
the first holds OUT's folder lock (`fpmgm_hf.training.runlock.folder_lock`, shared by every tool). On CPU,
`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is installed; use torchrun as above.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from ..data import (
    DATA_HELP,
    WRAPS,
    add_data_arguments,
    data_record,
    load_blocks,
    load_training_tokenizer,
    split_blocks,
)
from . import trainer_state
from .export import export
from .loop import (  # noqa: F401  (re-exported: the names `fpmgm_hf.training.train` had before the loop moved out)
    EMA,
    RESUME_KEYS,
    STATE_FILE,
    Trainer,
    add_loop_arguments,
    begin,
    check_loop_args,
    check_resume,
    make_accelerator,
    output_lock,
    resolve_resume,
    run_loop,
    start_run,
)
from .lora import add_lora

_SMALL = dict(hidden_size=768, num_attention_heads=12, cond_dim=128, dropout=0.1)
_TINY = dict(hidden_size=128, num_attention_heads=4, cond_dim=64, dropout=0.0)
PRESETS = {
    "mdlm-small": dict(_SMALL, num_pre_layers=12, num_fp_layers=0, num_post_layers=0),
    "fp-mdlm-small": dict(_SMALL, num_pre_layers=1, num_fp_layers=1, num_post_layers=1),
    "mdlm-tiny": dict(_TINY, num_pre_layers=6, num_fp_layers=0, num_post_layers=0),
    "fp-mdlm-tiny": dict(_TINY, num_pre_layers=1, num_fp_layers=1, num_post_layers=1),
}
# The paper's exact map (concat_mlp injection, 104M parameters at small size); it expands when iterated
# past its training range (docs/stability), so the default presets use the constrained injection.
for _name in ("fp-mdlm-small", "fp-mdlm-tiny"):
    PRESETS[f"{_name}-paper"] = dict(PRESETS[_name], injection="concat_mlp", fp_residual_reg=0.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fpmgm-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--modality", choices=["text", "image"], default="text",
      help="'image' trains class-conditional FP-MaskGIT on VQ token grids (see fpmgm_hf.images.train).")
    a("--data", required=True, help=DATA_HELP + " (docs/data.md).")
    a("--text-field", default="text", help="Field holding the text in JSON(L) files and Hub datasets.")
    a("--wrap", choices=WRAPS, default="none",
      help="'bos_eos': MDLM's [BOS] + (seq_len - 2) tokens + [EOS] blocks instead of plain seq_len cuts.")
    add_data_arguments(p)
    a("--tokenizer", default=None,
      help="Tokenizer folder or name (default: gpt2 with [MASK]; with --from, that folder's tokenizer).")
    a("--out", required=True, help="Output folder: log.jsonl, checkpoints/step_N, final/.")
    a("--preset", choices=sorted(PRESETS), default="fp-mdlm-tiny", help="Model architecture preset.")
    a("--config", default=None, help="JSON file (or config folder) of FPMGMConfig fields; replaces --preset.")
    a("--from", dest="init_from", default=None,
      help="Start from this save_pretrained folder (e.g. for the consistency stage).")
    a("--seq-len", type=int, default=128, help="Tokens per training block.")
    a("--val-fraction", type=float, default=0.05, help="Fraction of blocks (the last ones) held out for validation.")
    a("--batch-size", type=int, default=8, help="Blocks per process per micro-batch.")
    add_loop_arguments(p)
    a("--eps", type=float, default=1e-3, help="Epsilon of the log-linear noise schedule and of t ~ U[eps, 1].")
    a("--mixed-precision", choices=["no", "fp16", "bf16", "fp8"], default=None,
      help="Passed to Accelerator (default: from `accelerate launch` / config).")
    a("--sample-steps", type=int, default=8, help="Denoising steps of the samples whose entropy is logged.")
    a("--trust-remote-code", action="store_true",
      help="UNSAFE: let the --tokenizer (or --from) folder run its own Python code (an auto_map entry).")
    return p


def _check_args(args) -> None:
    for name in ("seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}.")
    if args.config and args.init_from:
        raise ValueError("give either --config (a fresh model) or --from (a trained one), not both.")
    for flag, path in (("--config", args.config), ("--from", args.init_from)):
        if path and not os.path.exists(path):
            raise ValueError(f"{flag}: {path!r} does not exist.")
    check_loop_args(args)


# ---------------------------------------------------------------------------------------------- model


def check_vocab(config, tokenizer, source: str) -> None:
    """The model's vocabulary and mask id must be the tokenizer's."""
    want = {"vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id}
    for key, value in want.items():
        if getattr(config, key) != value:
            raise ValueError(f"{source} has {key}={getattr(config, key)} but the tokenizer has {key}={value}.")


def read_config_fields(flag: str, path: str) -> dict:
    """The FPMGMConfig fields of a `--config` JSON file; unreadable JSON and unknown (e.g. misspelled) fields are
    refused naming the file and the fields."""
    import inspect

    from .. import FPMGMConfig

    data = trainer_state.read_json_object(path, f"--config {flag}")
    fields = {k: v for k, v in data.items() if not k.startswith("_")}
    known = set(inspect.signature(FPMGMConfig.__init__).parameters) | set(FPMGMConfig().to_dict())
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"--config {flag}: unknown FPMGMConfig field(s) {unknown} in {path} (misspelled?).")
    return fields


def build_model(args, tokenizer):
    from .. import FPMGMConfig, FPMGMForMaskedGeneration

    if args.init_from:
        model = FPMGMForMaskedGeneration.from_pretrained(args.init_from)
        check_vocab(model.config, tokenizer, f"--from {args.init_from}")
        return model
    vocab = {"vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id}
    if args.config:
        path = os.path.join(args.config, "config.json") if os.path.isdir(args.config) else args.config
        fields = read_config_fields(args.config, path)
        for key, value in vocab.items():
            if key in fields and fields[key] != value:
                raise ValueError(
                    f"--config {args.config} has {key}={fields[key]} but the tokenizer has {key}={value}."
                )
        fields.update(vocab)
    else:
        fields = dict(PRESETS[args.preset], **vocab, max_position_embeddings=max(1024, args.seq_len))
    torch.manual_seed(args.seed)
    return FPMGMForMaskedGeneration(FPMGMConfig(**fields))


# ------------------------------------------------------------------------------------------------ main


def prepare_data(args, tokenizer, accelerator):
    """`(train, val)` blocks of --data (`fpmgm_hf.data.load_blocks`): the main process tokenises and fills the
    `datasets` cache first, the other processes then read it."""
    with accelerator.main_process_first():
        blocks = load_blocks(args.data, tokenizer, args.seq_len, text_field=args.text_field, wrap=args.wrap,
                             streaming=args.streaming, num_proc=args.num_proc, cache_dir=args.data_cache_dir)
    return split_blocks(blocks, args.val_fraction)


def _modality(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--modality", default="text")
    return parser.parse_known_args(argv)[0].modality


def main(argv: Optional[list[str]] = None, *, log_with=()) -> str:
    """Entry point of `fpmgm-train`; returns the exported model folder. `--modality image` hands the
    arguments to `fpmgm_hf.images.train` (class-conditional FP-MaskGIT on VQ token grids). `log_with`: more
    Accelerate trackers (names or `GeneralTracker` objects) beside `--report-to`'s and the JSONL log."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _modality(argv) == "image":
        from ..images.train import main as image_main

        return image_main(argv, log_with=log_with)
    args = build_parser().parse_args(argv)
    _check_args(args)
    accelerator = make_accelerator(args, log_with)
    with output_lock(args.out, accelerator):
        return _train(args, accelerator)


def cli() -> int:
    """The `fpmgm-train` console script: `main`, exit status 0 (`main` returns the exported folder's path, which
    a console script would otherwise print to stderr as a failure)."""
    main()
    return 0


def _train(args, accelerator) -> str:
    resume = start_run(args, accelerator)
    tok_source = args.tokenizer
    if tok_source is None and args.init_from and os.path.isfile(os.path.join(args.init_from, "tokenizer_config.json")):
        tok_source = args.init_from
    tokenizer = load_training_tokenizer(tok_source, trust_remote_code=args.trust_remote_code)
    train_blocks, val_blocks = prepare_data(args, tokenizer, accelerator)
    model = build_model(args, tokenizer)
    if args.lora_r:
        model = add_lora(model, args.lora_r, args.lora_alpha)
    trainer = Trainer(args, accelerator, model, tokenizer, train_blocks, val_blocks)
    trainer.data_record = data_record(args.data, wrap=args.wrap, seq_len=args.seq_len, val_fraction=args.val_fraction,
                                      train=train_blocks, val=val_blocks, text_field=args.text_field)
    begin(trainer, resume)
    run_loop(trainer)
    return export(trainer)


if __name__ == "__main__":
    main()
