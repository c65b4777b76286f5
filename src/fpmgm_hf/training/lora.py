"""LoRA adapters (PEFT) on the transformer blocks, for `fpmgm-train --lora-r` and `fpmgm-convert --lora-r`.

Adapters of rank r sit on the blocks' Linear layers (pre, shared fixed-point and post: `attn_qkv`, `attn_out`,
`mlp.0`, `mlp.2`), without dropout (a dropout that changes between fixed-point iterations would make the map
non-stationary); the input injection trains in full (`modules_to_save`); everything else is frozen. The
adapter on the shared block is shared by every fixed-point iteration, like the block.

An exported run either merges the adapters (the default: a plain model) or keeps them (`--keep-adapter`):
the folder then holds the base weights (`config.json`, `model.safetensors`, exactly the model the adapters were
trained on) and the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) whose
`base_model_name_or_path` is the folder itself (or its Hub repo). It loads three ways:

- `AutoModel.from_pretrained(folder)` / `FPMGMForMaskedGeneration.from_pretrained(folder)`: transformers sees
  the adapter and applies it (peft installed);
- `PeftModel.from_pretrained(base, folder)` with `base` the original model (e.g. `fpmgm-train --from`'s);
- `AutoPeftModel.from_pretrained(folder, import_allowlist=["fpmgm_hf"])`: PEFT imports the base class named in
  `adapter_config.json` (`fpmgm_hf.modeling_fpmgm`) only from allowlisted packages, and fpmgm_hf is not on its
  default list (transformers, ...), so without the allowlist it refuses.
"""

from __future__ import annotations

import json
import os
from typing import Optional

# The Linear layers of the transformer blocks (pre, shared fixed-point and post); the conditioning MLP, the
# adaLN projections and the output head are left frozen, the input injection is trained in full.
LORA_TARGETS = r"model\.(pre|fp|post)_blocks\.\d+\.(attn\.attn_qkv|attn\.attn_out|mlp\.0|mlp\.2)"


def add_lora(model, r: int, alpha: Optional[float] = None):
    """Wrap `model` with PEFT LoRA adapters of rank `r` (alpha defaults to 2r, no dropout) on the blocks'
    Linear layers; the injection is trained in full (`modules_to_save`). Everything else is frozen. Undo with
    `merge_and_unload()`."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("--lora-r needs `peft` (pip install peft).") from err
    if r < 1:
        raise ValueError(f"--lora-r must be >= 1, got {r}.")
    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=0.0,
                        target_modules=LORA_TARGETS,
                        modules_to_save=["injection"] if getattr(model.model, "injection", None) is not None else None)
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def save_with_adapter(peft_model, folder: str, base_name_or_path: str) -> None:
    """Write the PEFT adapter and the unmodified base weights side by side into `folder`; the adapter's
    `base_model_name_or_path` becomes `base_name_or_path` (the folder's final path, or its Hub repo id).
    Consumes `peft_model` (its LoRA layers are removed)."""
    from peft.utils import ModulesToSaveWrapper

    peft_model.save_pretrained(folder)  # adapter_config.json, adapter_model.safetensors (and a README, replaced)
    originals = {name: {k: v.detach().clone() for k, v in module.original_module.state_dict().items()}
                 for name, module in peft_model.base_model.model.named_modules()
                 if isinstance(module, ModulesToSaveWrapper)}
    base = peft_model.unload()  # keeps the trained copy of a `modules_to_save` module: put the original back
    for name, state in originals.items():
        base.get_submodule(name).load_state_dict(state)
    base.save_pretrained(folder)
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = base_name_or_path
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def parameter_summary(model) -> dict:
    """Trainable / total parameter counts and the fp32 AdamW state they need (2 moments, bytes)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_parameters": total, "trainable_parameters": trainable,
            "adamw_state_bytes": 8 * trainable, "gradient_bytes": 4 * trainable}
