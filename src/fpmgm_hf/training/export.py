"""The end of a training run: `OUT/final`, a Hub-ready folder (weights and model code via `save_pretrained`, the
tokenizer or VQ files, a `checksums.json` manifest and a model card from `fpmgm_hf.hub`, the same code the
converter uses), written to `OUT/final.tmp` and renamed; then, with `--push-to-hub REPO_ID`, uploaded.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from accelerate.utils import DistributedType

from ..data import TRAINING_DATA_FILE
from ..hub import push_folder, render_model_card
from ..validation_fpmgm import replace_folder_atomically, write_manifest
from .lora import is_peft, save_with_adapter

CARD_SETTINGS = ("data", "seq_len", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "ema", "seed",
                 "consistency_weight", "consistency_warmup", "lora_r", "lora_alpha")


def save_model(model, folder: str, *, keep_adapter: bool, base_name_or_path: str, state_dict=None):
    """Save `model` into `folder` and return the plain model that was written: a LoRA model is merged, or with
    `keep_adapter` written as base weights + adapter (`training.lora.save_with_adapter`). `state_dict`: the
    gathered weights of a sharded (FSDP) run."""
    if not is_peft(model):
        model.save_pretrained(folder, state_dict=state_dict)
        return model
    if keep_adapter:
        base = model.get_base_model()
        save_with_adapter(model, folder, base_name_or_path)
        return base
    merged = model.merge_and_unload()
    merged.save_pretrained(folder)
    return merged


def card_settings(trainer) -> dict:
    a = trainer.args
    settings = {k.replace("_", " "): getattr(a, k) for k in CARD_SETTINGS
                if getattr(a, k, None) not in (None, 0, 0.0, False)}
    settings.update({"processes": trainer.acc.num_processes, "optimizer steps": trainer.step})
    if trainer.lr is not None:
        settings["lr"] = trainer.lr
    return settings


def results_table(trainer, kind: str) -> str:
    last = trainer.last_eval
    if not last:
        return ""
    what = ("MDLM NELBO (nats/token, an upper bound on the NLL; one antithetic mask draw per batch from a fixed seed)"
            if kind == "text" else "masked cross-entropy of MaskGIT masks (fixed seed)")
    return "\n".join([f"Validation {what} on the run's held-out blocks, at step {last['step']}.", "",
                      "| step | validation loss | exp(loss) |", "|---|---|---|",
                      f"| {last['step']} | {last['val_nelbo']:.4f} | {math.exp(min(last['val_nelbo'], 700.0)):.2f} |"])


def model_card(trainer, model, kind: str, folder: str, adapter: bool, **fields):
    a = trainer.args
    source = getattr(a, "init_from", None)
    how = "`fpmgm-train`" if kind == "text" else "`fpmgm-train --modality image`"
    provenance = (f"Trained with {how} from a local checkpoint (`{os.path.basename(os.path.normpath(source))}`)."
                  if source else f"Trained from scratch with {how}.")
    run = os.path.basename(os.path.abspath(a.out))
    return render_model_card(model, kind=kind, repo_id=a.push_to_hub or f"{run}/{os.path.basename(folder)}",
                             revision=a.revision or "main", settings=card_settings(trainer),
                             results=results_table(trainer, kind), provenance=provenance, adapter=adapter,
                             model_name=a.push_to_hub.split("/")[-1] if a.push_to_hub else run, **fields)


def export(trainer, kind: str = "text", card_fields: Optional[dict] = None) -> str:
    """Write `OUT/final` (main process; EMA weights when `--ema`) and push it with `--push-to-hub`; returns its path.
    `kind` picks the card template ("text" / "image"); `card_fields` are extra template fields."""
    acc, a = trainer.acc, trainer.args
    acc.wait_for_everyone()
    path = os.path.join(a.out, "final")
    # FSDP holds each rank's shard only: every rank takes part in gathering the full weights (an EMA or LoRA
    # export under FSDP is not covered: neither was run sharded here).
    sharded = acc.distributed_type == DistributedType.FSDP and trainer.ema is None
    full_state = acc.get_state_dict(trainer.model) if sharded else None
    if acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        if trainer.ema is not None:
            trainer.ema.swap(model)
        keep = bool(getattr(a, "keep_adapter", False))
        written = {}

        def fill(tmp: str) -> None:  # the whole folder, then one atomic swap: `final/` is never half-written
            written["plain"] = save_model(model, tmp, keep_adapter=keep, base_name_or_path=getattr(
                a, "push_to_hub", None) or os.path.abspath(path), state_dict=full_state)
            trainer.tokenizer.save_pretrained(tmp)
            record = getattr(trainer, "data_record", None)
            if record is not None:  # how the blocks were framed and which were held out (read by the converter)
                with open(os.path.join(tmp, TRAINING_DATA_FILE), "w", encoding="utf-8") as f:
                    json.dump(record, f, indent=1)
            model_card(trainer, written["plain"], kind, path, adapter=keep,
                       **(card_fields or {})).save(os.path.join(tmp, "README.md"))
            write_manifest(tmp)  # now over the tokenizer / VQ files and the card too

        replace_folder_atomically(path, fill, carry_over=False)
        plain = written["plain"]
        if trainer.ema is not None and plain is model:
            trainer.ema.swap(model)
        if getattr(a, "push_to_hub", None):
            url = push_folder(path, a.push_to_hub, private=a.private, revision=a.revision)
            trainer.log({"event": "push", "step": trainer.step, "repo_id": a.push_to_hub, "url": url})
    acc.wait_for_everyone()
    return path
