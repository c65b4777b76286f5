"""`fpmgm-convert`: convert a pretrained MDLM into an FP-MDLM (arXiv 2605.31215, §3.4) and save a Hub-ready folder.

    accelerate launch conversion/convert.py --mdlm kuleshov-group/mdlm-owt --map 1,6,12 --data openwebtext \\
        --steps 40000 --output outputs/fp-mdlm-owt
    fpmgm-convert --mdlm path/to/mdlm.ckpt --map auto --dry-run --output outputs/fp-mdlm

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 conversion/convert.py ...   # 2 CPU processes

`conversion/convert.py` in the repository only runs this module's `main`. Steps: import the MDLM checkpoint (EMA
weights by default) -> choose layers (`--map`, or `auto` from the layer CKA) -> build the FP-MDLM -> verify
(teacher vs converted validation NELBO on a small batch, one decoded sample) -> optionally fine-tune against the
frozen MDLM (`fpmgm_hf.conversion.distill.finetune`, i.e. the `fpmgm_hf.training.loop.Trainer` loop:
checkpoints in `--work-dir` rotated by `--save-total-limit`, `--resume latest`, Accelerate trackers with a
JSONL log per stage, validation, early stop; optional consistency term / stage and LoRA) -> save with
`save_pretrained` (code files + auto_map, generation_config.json) plus the tokenizer, a README.md model card and
a `conversion.json` report -> optionally push the folder to the Hub. Only the main process writes, into
`OUTPUT.tmp-*` (with a `checksums.json` manifest), swapped into place at the end; it holds OUTPUT's folder lock for the
whole run, so a second conversion to the same output is refused. A Lightning `.ckpt` is read without running
code from it (`--trust-pickle` to override, unsafe), and a `--tokenizer` folder's own code only runs with
`--trust-remote-code`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..data import DATA_HELP, WRAPS, add_data_arguments

VERIFY_TEXT = (
    "The cat sat on the mat and the dog ran far away. It was a very good day for all of us, and we "
    "went home to see the sun go down. Then she said that the city had changed since the war, but the "
    "people were still kind, and the market near the river sold fresh bread every morning. "
)
CKA_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fpmgm-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mdlm", required=True,
                   help="MDLM checkpoint: Hub repo id (e.g. kuleshov-group/mdlm-owt), a folder with config.json + "
                        "model.safetensors, a single .safetensors file, or a Lightning .ckpt")
    p.add_argument("--trust-pickle", action="store_true",
                   help="UNSAFE: read a Lightning .ckpt with full unpickling, which runs any code the file contains "
                        "(default: tensors, plain containers and Lightning's config / tokenizer objects only; "
                        "anything else is refused by name)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="for a Lightning .ckpt: use the EMA weights ckpt['ema']['shadow_params'] (--no-ema: "
                        "ckpt['state_dict']); Hub weights are a single set")
    p.add_argument("--map", default="auto",
                   help="1-based MDLM layers for the pre, shared fixed-point and post blocks, in order "
                        "(num_pre + num_fp + num_post ids, e.g. 1,6,12), or 'auto' to choose them from the layer CKA "
                        "(cka.png and the chosen mapping go into the output folder and its model card)")
    p.add_argument("--layers", default="1/1/1", help="block counts num_pre/num_fp/num_post of the FP-MDLM")
    p.add_argument("--injection", default="constrained", choices=["constrained", "concat_mlp", "add", "none"],
                   help="input injection of the shared block: 'constrained' (default; a contraction in the state, "
                        "exact identity at one iteration) or the paper's 'concat_mlp' (close to the identity)")
    p.add_argument("--fp-max-iter", type=int, default=None,
                   help="solver iterations per forward of the saved model (default: the config default)")
    p.add_argument("--output", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true",
                   help="import + map + verify + save, without fine-tuning")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or local folder; its length (mask token included) must equal the "
                        "checkpoint's vocab size (default: the --mdlm folder's own tokenizer when it has one, else "
                        "gpt2)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="UNSAFE: let a --tokenizer folder run its own Python code (an auto_map entry)")
    p.add_argument("--data", default=None,
                   help="text for verification and fine-tuning, read as fpmgm-train reads it (docs/data.md): "
                        f"{DATA_HELP} ('train' split, e.g. openwebtext); default: a built-in paragraph for "
                        "verification only")
    p.add_argument("--text-field", default="text", help="field holding the text in JSON/Hub records")
    p.add_argument("--wrap", choices=("auto",) + WRAPS, default="auto",
                   help="block framing: 'bos_eos' = MDLM's [BOS] + (seq_len - 2) tokens + [EOS], 'none' = plain "
                        "seq_len cuts (fpmgm-train's default); 'auto': the teacher's own framing (the "
                        "training_data.json fpmgm-train writes next to its weights), else bos_eos when the tokenizer "
                        "has BOS and EOS (MDLM's OWT recipe)")
    p.add_argument("--allow-framing-mismatch", action="store_true",
                   help="accept a --wrap that differs from the teacher's recorded framing (refused by default: the "
                        "student would learn a framing its teacher never saw)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="held-out share of the --data blocks: the last fraction, never trained on, the same rule "
                        "fpmgm-train and the evaluations use (default: the teacher's recorded value, else 0.05); "
                        "with a teacher record for the same data, the held-out blocks must be the teacher's")
    add_data_arguments(p, streaming_default=None)
    p.add_argument("--seq-len", type=int, default=None,
                   help="training / verification block length (default: the model's max_position_embeddings)")
    p.add_argument("--verify-batch", type=int, default=4, help="blocks in the verification batch")
    p.add_argument("--verify-length", type=int, default=None,
                   help="block length of the verification batch (default: --seq-len)")
    p.add_argument("--verify-repeats", type=int, default=2, help="mask draws averaged by the verification NELBO")
    p.add_argument("--sample-length", type=int, default=64, help="length of the decoded verification sample")
    p.add_argument("--sample-steps", type=int, default=32, help="denoising steps of the verification sample")
    p.add_argument("--steps", type=int, default=40000, help="fine-tuning optimizer steps (paper: 40k)")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning micro-batch size per process")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="gradient-accumulation steps (default: accelerate's setting, else 1); the global batch is "
                        "batch-size x grad-accum x processes")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (constant)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--kl-weight", type=float, default=0.1, help="lambda, the weight of the tempered KL term")
    p.add_argument("--kl-warmup", type=int, default=5000, help="steps over which lambda rises linearly from 0")
    p.add_argument("--tau", type=float, default=1.5, help="distillation temperature")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="weight of a hidden-state term: the student's fixed point (the post blocks' input) pulled "
                        "towards the teacher's residual stream entering the first post layer (layer-normalised MSE)")
    p.add_argument("--gap", type=float, nargs=2, default=(0.05, 0.30), metavar=("LO", "HI"),
                   help="range of the noise-level gap t_s - t_c between student and teacher")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--log-every", type=int, default=50,
                   help="print the training record every N steps (every step goes to WORK_DIR/<stage>/log.jsonl)")
    p.add_argument("--val-blocks", type=int, default=8,
                   help="held-out blocks used for the validation NELBO/PPL of --eval-every (the first of the held-out "
                        "split)")
    p.add_argument("--max-train-blocks", type=int, default=None,
                   help="read only this many training blocks (for corpora too large to hold in memory, e.g. a "
                        "streamed OpenWebText): the held-out blocks are then the first ones read instead of the "
                        "last --val-fraction, which the report says")
    p.add_argument("--eval-every", type=int, default=500, help="validate every N optimizer steps (and at the end)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation batches per process per evaluation")
    p.add_argument("--save-every", type=int, default=1000,
                   help="save a resumable checkpoint (accelerator.save_state) every N steps and at the end of a stage "
                        "(0 = never)")
    p.add_argument("--save-total-limit", type=int, default=None,
                   help="keep only the newest N checkpoints of each stage (Accelerate ProjectConfiguration."
                        "total_limit); default: all")
    p.add_argument("--report-to", default=None,
                   help="comma-separated Accelerate trackers besides each stage's log.jsonl (tensorboard, wandb, ...; "
                        "'none'); default: tensorboard when installed")
    p.add_argument("--work-dir", default=None,
                   help="folder of the logs and checkpoints (default: OUTPUT.work next to --output)")
    p.add_argument("--resume", default=None,
                   help="'latest' (newest checkpoint in --work-dir; starts from scratch when there is none) or a "
                        "checkpoint folder WORK_DIR/<stage>/checkpoints/step_N: continue an interrupted conversion")
    p.add_argument("--consistency-weight", type=float, default=0.0,
                   help="target lambda of the CoFRe hidden-state consistency loss (0 = off); the output is set up "
                        "for 3SR reuse")
    p.add_argument("--consistency-warmup", type=int, default=5000, help="steps of the linear lambda ramp 0 -> target")
    p.add_argument("--consistency-gap", type=float, nargs=2, default=(0.05, 0.30), metavar=("LO", "HI"),
                   help="range of the teacher time gap of the consistency loss")
    p.add_argument("--consistency-steps", type=int, default=0,
                   help="0: add the consistency term to the distillation loss; N > 0: a following consistency "
                        "stage of N steps (fpmgm_hf.training's CoFRe loss) after the --steps distillation steps")
    p.add_argument("--stop-ppl-rise", type=float, default=0.15,
                   help="with consistency: stop at the first eval whose val PPL exceeds the pre-stage value by this "
                        "fraction")
    p.add_argument("--lora-r", type=int, default=0,
                   help="train LoRA adapters of this rank on the blocks' Linear layers (+ the full injection) "
                        "instead of all weights; merged before saving unless --keep-adapter (needs peft)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x --lora-r)")
    p.add_argument("--keep-adapter", action="store_true",
                   help="with --lora-r: save the mapped base weights plus the PEFT adapter (adapter_config.json, "
                        "adapter_model.safetensors) instead of merging them (fpmgm_hf.training.lora)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="upload the finished output folder to this Hub repo (main process, after the save)")
    p.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")
    p.add_argument("--revision", default=None, help="branch of the --push-to-hub repo (created if missing)")
    p.add_argument("--cka-batch", type=int, default=4, help="blocks used by --map auto to compute the layer CKA")
    p.add_argument("--seed", type=int, default=0, help="seed of the injection init, masks and sampling")
    return p


def _say(state, msg: str) -> None:
    if state.is_main_process:
        print(msg, flush=True)


def _teacher_tokenizer(source) -> Optional[str]:
    """The --mdlm folder itself when it holds a tokenizer (an MDLM trained with fpmgm-train saves one)."""
    folder = str(source)
    has = os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f))
                                       for f in ("tokenizer.json", "tokenizer_config.json"))
    return folder if has else None


def parse_layers(spec: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in spec.split("/"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or parts[1] < 1:
        raise ValueError(f"--layers expects num_pre/num_fp/num_post with num_fp >= 1 (e.g. 1/1/1), got {spec!r}.")
    return parts  # type: ignore[return-value]


def load_tokenizer(name_or_path: str, vocab_size: int, mask_token_id: int, trust_remote_code: bool = False):
    """A local folder loads with AutoTokenizer (its own code only with `trust_remote_code`); a name goes through
    `fpmgm_hf.data.assets.load_tokenizer` (offline fallback, [MASK] appended). Then the vocab must match."""
    from ..data import auto_tokenizer
    from ..data.assets import load_tokenizer as shared

    if os.path.isdir(name_or_path):
        tok = auto_tokenizer(name_or_path, trust_remote_code)
    else:
        tok = shared(name_or_path=name_or_path, offline_fallback=True, add_mask_token=True)
    if tok.mask_token_id is None and len(tok) == vocab_size - 1:
        tok.add_special_tokens({"mask_token": "[MASK]"})
    if len(tok) != vocab_size:
        raise ValueError(
            f"tokenizer/checkpoint vocab mismatch: tokenizer {name_or_path!r} has {len(tok)} tokens (mask included) "
            f"but the checkpoint's vocab_size is {vocab_size}."
        )
    if tok.mask_token_id is not None and tok.mask_token_id != mask_token_id:
        raise ValueError(
            f"tokenizer/checkpoint vocab mismatch: the tokenizer's mask token id is {tok.mask_token_id} but the "
            f"checkpoint's mask_token_id is {mask_token_id}."
        )
    return tok


# ------------------------------------------------------------------------------------------------ data


def teacher_record(args) -> Optional[dict]:
    """The teacher's training-data record (`training_data.json` in a `--mdlm` folder trained by fpmgm-train)."""
    from ..data import read_data_record

    return read_data_record(args.mdlm) if os.path.isdir(str(args.mdlm)) else None


def block_wrap(args, tokenizer, seq_len: int, record: Optional[dict] = None) -> str:
    """`--wrap` resolved: 'auto' is the teacher's recorded framing, else MDLM's BOS/EOS framing when the tokenizer
    has both tokens. An explicit framing that contradicts the record is refused unless --allow-framing-mismatch."""
    if args.wrap == "auto":
        if record is not None:
            return record["wrap"]
        has_both = tokenizer.bos_token_id is not None and tokenizer.eos_token_id is not None
        return "bos_eos" if has_both and seq_len > 2 else "none"
    if record is not None and args.wrap != record["wrap"] and not args.allow_framing_mismatch:
        raise ValueError(f"--wrap {args.wrap!r} differs from the teacher's framing {record['wrap']!r} (recorded in "
                         f"{args.mdlm}/training_data.json); leave --wrap auto, or pass --allow-framing-mismatch.")
    return args.wrap


def data_blocks(args, tokenizer, seq_len: int, wrap: str, max_blocks: Optional[int] = None) -> torch.Tensor:
    """`(N, seq_len)` blocks of --data by the rule fpmgm-train uses (`fpmgm_hf.data.load_blocks`), framed by
    `wrap`; Hub datasets are streamed unless --no-streaming. `max_blocks` stops early."""
    from ..data import is_hub_dataset, load_blocks

    streaming = is_hub_dataset(args.data) if args.streaming is None else args.streaming
    return load_blocks(args.data, tokenizer, seq_len, text_field=args.text_field, wrap=wrap, streaming=streaming,
                       num_proc=args.num_proc, cache_dir=args.data_cache_dir, max_blocks=max_blocks)


def split_data(args, tokenizer, seq_len: int, state,
               record: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`(train, heldout, info)` blocks of --data. The held-out blocks are the last --val-fraction, as fpmgm-train
    and the evaluations hold out, and they must be the teacher's own held-out blocks when its record names the
    same data, length and framing; with --max-train-blocks they are the first blocks read instead."""
    from ..data import data_name, fingerprint, split_blocks

    wrap = block_wrap(args, tokenizer, seq_len, record)
    fraction = args.val_fraction if args.val_fraction is not None else (record or {}).get("val_fraction", 0.05)
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}.")
    head = args.max_train_blocks is not None
    held = max(args.val_blocks, args.verify_batch)
    with state.main_process_first():
        blocks = data_blocks(args, tokenizer, seq_len, wrap, max_blocks=held + args.max_train_blocks if head else None)
    if len(blocks) <= held:
        raise ValueError(f"--data {args.data!r} yields {len(blocks)} blocks of {seq_len} tokens, not more than the "
                         f"{held} held out for validation and verification.")
    train, heldout = (blocks[held:], blocks[:held]) if head else split_blocks(blocks, fraction)
    info = {"wrap": wrap, "heldout": "first blocks read (--max-train-blocks)" if head else f"last {fraction:g}",
            "heldout_blocks": int(heldout.shape[0]), "heldout_fingerprint": fingerprint(heldout)}
    same_data = record is not None and (record["data"], record["seq_len"], record["wrap"]) == (
        data_name(args.data), seq_len, wrap)
    if same_data and not head and info["heldout_fingerprint"] != record.get("heldout_fingerprint"):
        raise ValueError(f"the held-out blocks of --data {args.data!r} ({heldout.shape[0]} blocks, fingerprint "
                         f"{info['heldout_fingerprint']}) are not the teacher's ({record.get('heldout_blocks')} "
                         f"blocks, {record.get('heldout_fingerprint')}): fine-tuning would train on text the teacher "
                         f"held out. Use the teacher's --val-fraction ({record['val_fraction']}) and the same data.")
    info["matches_teacher"] = bool(same_data and not head)
    return train, heldout, info


def verification_batch(args, tokenizer, seq_len: int, heldout: Optional[torch.Tensor]) -> torch.Tensor:
    """`(verify_batch, length)` clean tokens: with --data the first held-out blocks (never trained on), else the
    built-in paragraph repeated."""
    length = args.verify_length or seq_len
    if heldout is not None:
        if heldout.shape[0] < args.verify_batch:
            raise ValueError(f"--data {args.data!r} holds out {heldout.shape[0]} blocks, fewer than --verify-batch "
                             f"{args.verify_batch}.")
        if length != heldout.shape[1]:
            raise ValueError(f"--verify-length {length} must equal --seq-len {heldout.shape[1]} with --data (the "
                             "verification blocks are held-out training blocks).")
        return heldout[: args.verify_batch]
    ids = tokenizer(VERIFY_TEXT, add_special_tokens=False)["input_ids"]
    reps = -(-length * args.verify_batch // max(len(ids), 1))
    flat = torch.tensor((ids * reps)[: length * args.verify_batch], dtype=torch.long)
    return flat.view(args.verify_batch, length)


# ----------------------------------------------------------------------------------------------- steps


def cka_mapping(teacher, x0, num_pre, num_fp, num_post, seed):
    """Average layer CKA over masked copies of x0 at t in CKA_TIMES, then the mapping rule."""
    from .layer_mapping import linear_cka_matrix, pick_mapping_from_cka

    g = torch.Generator().manual_seed(seed)
    mats = []
    for t in CKA_TIMES:
        masked = torch.rand(x0.shape, generator=g) < t
        z = torch.where(masked, torch.full_like(x0, teacher.config.mask_token_id), x0)
        mats.append(linear_cka_matrix(teacher, z.to(teacher.device)))
    cka = torch.stack(mats).mean(0)
    return cka, pick_mapping_from_cka(cka, num_pre, num_fp, num_post)


def verify(state, teacher, student, x0, tokenizer, args) -> dict:
    from .distill import masked_nelbo

    x0 = x0.to(student.device)
    report = {
        "teacher_nelbo": masked_nelbo(teacher, x0, seed=args.seed, repeats=args.verify_repeats),
        "converted_nelbo_1iter": masked_nelbo(student, x0, seed=args.seed, repeats=args.verify_repeats, fp_iters=1),
        "converted_nelbo": masked_nelbo(student, x0, seed=args.seed, repeats=args.verify_repeats),
    }
    _say(state, f"[verify] validation NELBO (nats/token, {tuple(x0.shape)} tokens): teacher "
                f"{report['teacher_nelbo']:.4f} | converted @1 iter {report['converted_nelbo_1iter']:.4f} | "
                f"converted @{student.config.fp_max_iter} iters {report['converted_nelbo']:.4f}")
    try:
        g = torch.Generator(device=student.device).manual_seed(args.seed)  # the sampler draws on the model's device
        with torch.no_grad():
            length = min(args.sample_length, student.config.max_position_embeddings)
            sample = student.generate(batch_size=1, seq_len=length, num_steps=args.sample_steps, generator=g)
        report["sample"] = tokenizer.decode(sample[0].tolist())
        _say(state, f"[verify] sample: {report['sample']!r}")
    except Exception as err:  # noqa: BLE001 - a sampling failure must not hide the conversion result
        report["sample_error"] = f"{type(err).__name__}: {err}"
        _say(state, f"[verify] WARNING: sampling failed: {report['sample_error']}")
    return report


def results_table(report: dict) -> str:
    """Markdown table of the verification NELBO / PPL (teacher vs converted, before / after fine-tuning)."""
    import math

    rows = [("MDLM teacher", report["verify_before"]["teacher_nelbo"]),
            ("converted, 1 iteration, before fine-tuning", report["verify_before"]["converted_nelbo_1iter"]),
            ("converted, before fine-tuning", report["verify_before"]["converted_nelbo"])]
    if "verify_after" in report:
        rows += [("converted, 1 iteration, after fine-tuning", report["verify_after"]["converted_nelbo_1iter"]),
                 ("converted, after fine-tuning", report["verify_after"]["converted_nelbo"])]
    shape = report.get("verify_shape")
    lines = [f"Validation NELBO (nats/token) and its PPL = exp(NELBO) on the conversion's held-out verification "
             f"batch ({shape[0]} blocks x {shape[1]} tokens, {report.get('verify_repeats')} mask draws, the same "
             f"t's and masks for every model; an upper bound on the NLL, not MDLM's published perplexity).",
             "", "| model | NELBO | PPL |", "|---|---|---|"]
    lines += [f"| {name} | {v:.4f} | {math.exp(min(v, 700.0)):.2f} |" for name, v in rows]
    return "\n".join(lines)


def model_card(student, report: dict, repo_id: Optional[str], revision: Optional[str], output: Path,
               adapter: bool = False):
    """The card: `base_model` (metadata and link) only for a Hub source, local paths reduced to their name
    (`fpmgm_hf.hub`, shared with fpmgm-train)."""
    from ..hub import render_model_card

    how = " (chosen by --map auto from the layer CKA; see cka.png)" if report.get("mapping_from", "").startswith(
        "layer CKA") else ""
    settings = {"source": report["source"], "weights": "EMA" if report["ema"] else "raw",
                "layer mapping": ",".join(map(str, report["mapping"])) + how, "layers (pre/fp/post)":
                "/".join(map(str, report["layers"])), "injection": report["injection"]}
    for key, value in report.get("training", {}).items():
        if key != "work_dir":  # a local folder, of no use to a reader of the card
            settings[f"fine-tuning {key}"] = value
    return render_model_card(student, kind="text", repo_id=repo_id or output.name, revision=revision or "main",
                             base_model=report["source"], settings=settings, results=results_table(report),
                             adapter=adapter)


def save_atomic(state, student, tokenizer, output: Path, overwrite: bool, report: dict, cka=None,
                card=None, adapter_base: Optional[str] = None) -> None:
    """Main process only: write into OUTPUT.tmp-<id>, then move it into place (replacing on --overwrite). With
    `adapter_base` a LoRA student is saved as base weights + adapter whose base is `adapter_base`."""
    if state.is_main_process:
        from ..training.export import save_model
        from ..validation_fpmgm import replace_folder_atomically, write_manifest

        if output.exists() and not overwrite:
            raise FileExistsError(f"{output} appeared while converting; pass --overwrite to replace it.")

        def fill(tmp: str) -> None:  # the whole folder, then one atomic swap with any old one
            tmp = Path(tmp)
            save_model(student, str(tmp), keep_adapter=adapter_base is not None, base_name_or_path=adapter_base)
            tokenizer.save_pretrained(str(tmp))
            if card is not None:
                card.save(str(tmp / "README.md"))
            if cka is not None:
                from .layer_mapping import save_cka_png

                torch.save(cka, tmp / "cka.pt")
                report["cka_png"] = save_cka_png(cka, tmp / "cka.png")
            (tmp / "conversion.json").write_text(json.dumps(report, indent=2, default=str))
            write_manifest(str(tmp))  # sha256 of every file, verified by from_pretrained

        replace_folder_atomically(output, fill, carry_over=False)
    state.wait_for_everyone()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..training.runlock import folder_lock

    # Like Accelerator: ACCELERATE_USE_CPU=1 (e.g. under torchrun on CPU) must give a multi-CPU state here too,
    # otherwise every process would see itself as the main process.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    output = Path(args.output)
    # A sibling file: the output folder itself is replaced at the end. One conversion per output at a time.
    with folder_lock(output, enabled=state.is_main_process):
        return convert(args, state, output)


def check_convert_numbers(args) -> None:
    """The converter's numeric flags, each refusal naming its flag and the valid range."""
    import math

    ints = {"steps": 0, "consistency_steps": 0, "batch_size": 1, "verify_batch": 1, "verify_repeats": 1,
            "sample_length": 1, "sample_steps": 1, "val_blocks": 1, "eval_batches": 0, "save_every": 0,
            "eval_every": 0, "kl_warmup": 0, "consistency_warmup": 0, "warmup_steps": 0, "cka_batch": 1,
            "log_every": 0}
    for name, low in ints.items():
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}.")
    floats = {"lr": (0, False), "tau": (0, False), "kl_weight": (0, True), "clip": (0, True),
              "consistency_weight": (0, True)}
    for name, (low, inclusive) in floats.items():
        v = getattr(args, name)
        if not (math.isfinite(v) and (v >= low if inclusive else v > low)):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number {'>=' if inclusive else '>'} "
                             f"{low}, got {v}.")
    for name in ("gap", "consistency_gap"):
        lo, hi = getattr(args, name)
        if not (0 <= lo <= hi < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be LO HI with 0 <= LO <= HI < 1, got {lo} {hi}.")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {args.seed}.")


def convert(args, state, output: Path) -> int:
    from ..training.loop import check_rotation_and_adapter_args
    from .layer_mapping import map_layers
    from .mdlm_import import load_mdlm_checkpoint

    if output.exists() and not args.overwrite:
        raise FileExistsError(f"output {output} exists; pass --overwrite to replace it.")
    num_pre, num_fp, num_post = parse_layers(args.layers)
    train = not args.dry_run and (args.steps > 0 or args.consistency_steps > 0)
    if args.consistency_steps > 0 and args.consistency_weight <= 0:
        raise ValueError("--consistency-steps needs --consistency-weight > 0.")
    check_rotation_and_adapter_args(args)
    check_convert_numbers(args)
    if not 0 <= args.hidden_weight < float("inf"):
        raise ValueError(f"--hidden-weight must be a finite number >= 0, got {args.hidden_weight}.")
    if args.hidden_weight > 0 and num_post == 0:
        raise ValueError("--hidden-weight needs a post block (its input is what the term matches); --layers has none.")
    if args.resume and not train:
        raise ValueError("--resume continues fine-tuning; it cannot be combined with --dry-run / --steps 0.")
    if train and not args.data:
        raise ValueError("fine-tuning needs --data (e.g. openwebtext); use --dry-run to convert without training.")
    work = Path(args.work_dir) if args.work_dir else output.with_name(output.name + ".work")
    if train and not args.resume and work.exists() and any(work.iterdir()):
        if not args.overwrite:
            raise FileExistsError(f"work folder {work} holds an earlier run's logs/checkpoints; pass --resume latest "
                                  f"to continue it or --overwrite to start over.")
        if state.is_main_process:
            shutil.rmtree(work)
        state.wait_for_everyone()
    t0 = time.time()

    teacher = load_mdlm_checkpoint(args.mdlm, ema=args.ema, trust_pickle=args.trust_pickle).to(state.device)
    cfg = teacher.config
    _say(state, f"[import] {args.mdlm}: {cfg.num_pre_layers} layers, hidden {cfg.hidden_size}, heads "
                f"{cfg.num_attention_heads}, vocab {cfg.vocab_size} ({'EMA' if args.ema else 'raw'} weights) "
                f"in {time.time() - t0:.1f}s")
    tok_source = args.tokenizer or _teacher_tokenizer(args.mdlm) or "gpt2"
    tokenizer = load_tokenizer(tok_source, cfg.vocab_size, cfg.mask_token_id, args.trust_remote_code)
    seq_len = args.seq_len or cfg.max_position_embeddings
    record = teacher_record(args)
    train_blocks = heldout = data_info = None
    if args.data:
        train_blocks, heldout, data_info = split_data(args, tokenizer, seq_len, state, record)
        _say(state, f"[data] {args.data}: framing {data_info['wrap']!r}, held out: {data_info['heldout']} "
                    f"({data_info['heldout_blocks']} blocks" + (", the teacher's own" if data_info["matches_teacher"]
                                                                 else "") + ")")
    x_val = verification_batch(args, tokenizer, seq_len, heldout)

    cka = None
    mapping = args.map
    if args.map.strip().lower() == "auto":
        n = min(args.cka_batch, x_val.shape[0])
        cka, mapping = cka_mapping(teacher, x_val[:n], num_pre, num_fp, num_post, args.seed)
        consecutive = [round(float(cka[i, i + 1]), 3) for i in range(cka.shape[0] - 1)]
        _say(state, f"[map] consecutive-layer CKA {consecutive} -> --map {','.join(map(str, mapping))}")
    overrides = {} if args.fp_max_iter is None else {"fp_max_iter": args.fp_max_iter}
    student = map_layers(teacher, mapping, num_pre, num_fp, num_post, injection=args.injection, seed=args.seed,
                         **overrides).eval()
    mapping = [int(v) for v in (mapping.split(",") if isinstance(mapping, str) else mapping)]
    _say(state, f"[map] layers {mapping} -> pre/fp/post {num_pre}/{num_fp}/{num_post}; "
                f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters")

    report = {"source": args.mdlm, "ema": args.ema, "mapping": mapping, "layers": [num_pre, num_fp, num_post],
              "mapping_from": "layer CKA (--map auto)" if cka is not None else "--map",
              "injection": args.injection, "tokenizer": tok_source, "seed": args.seed, "data": data_info,
              "verify_shape": list(x_val.shape), "verify_repeats": args.verify_repeats,
              "verify_before": verify(state, teacher, student, x_val, tokenizer, args)}
    if train:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from ..training.tracking import parse_report_to
        from .distill import finetune

        accum = {} if args.grad_accum is None else {"gradient_accumulation_steps": args.grad_accum}
        project = ProjectConfiguration(project_dir=str(work), total_limit=args.save_total_limit)
        accelerator = Accelerator(log_with=parse_report_to(args.report_to) or None, project_config=project, **accum)
        val_blocks = heldout[: args.val_blocks]
        _say(state, f"[train] {train_blocks.shape[0]} training / {val_blocks.shape[0]} validation blocks of "
                    f"{seq_len} tokens; logs and checkpoints in {work}")
        student, summary = finetune(
            student, teacher, tokenizer, train_blocks, val_blocks, work_dir=str(work), steps=args.steps,
            consistency_steps=args.consistency_steps, batch_size=args.batch_size, accelerator=accelerator,
            lr=args.lr, warmup_steps=args.warmup_steps, clip=args.clip, kl_weight=args.kl_weight,
            kl_warmup=args.kl_warmup, tau=args.tau, gap=tuple(args.gap), consistency_weight=args.consistency_weight,
            consistency_warmup=args.consistency_warmup, consistency_gap=tuple(args.consistency_gap),
            stop_ppl_rise=args.stop_ppl_rise, eval_every=args.eval_every, eval_batches=args.eval_batches,
            save_every=args.save_every, seed=args.seed, resume=args.resume, lora_r=args.lora_r,
            lora_alpha=args.lora_alpha, merge=not args.keep_adapter, log_every=args.log_every,
            log=lambda m: _say(state, f"[train] {m}"), hidden_weight=args.hidden_weight,
            hidden_layer=mapping[num_pre + num_fp] if num_post else None)
        keys = ("steps", "batch_size", "lr", "warmup_steps", "clip", "kl_weight", "kl_warmup", "tau", "gap", "data",
                "hidden_weight",
                "consistency_weight", "consistency_warmup", "consistency_steps", "stop_ppl_rise", "lora_r")
        report["training"] = {k: getattr(args, k) for k in keys}
        report["training"].update(processes=state.num_processes, grad_accum=accelerator.gradient_accumulation_steps,
                                  train_blocks=int(train_blocks.shape[0]), seq_len=seq_len, work_dir=str(work),
                                  wrap=data_info["wrap"])
        report["finetune"] = summary
        student = student.to(state.device)
        report["verify_after"] = verify(state, teacher, student, x_val, tokenizer, args)
    if args.consistency_weight > 0 and train:
        student.generation_config.reuse = "3sr"  # consistency-trained: ready for three-state reuse
    card = model_card(student.cpu(), report, args.push_to_hub, args.revision, output, adapter=args.keep_adapter)
    adapter_base = (args.push_to_hub or str(output.resolve())) if args.keep_adapter else None
    save_atomic(state, student.cpu(), tokenizer, output, args.overwrite, report, cka, card, adapter_base)
    _say(state, f"[save] {output} ({time.time() - t0:.1f}s total)")
    if args.push_to_hub and state.is_main_process:
        from ..hub import push_folder

        url = push_folder(output, args.push_to_hub, private=args.private, revision=args.revision)
        _say(state, f"[push] {args.push_to_hub}: {url}")
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
