"""Import a pretrained MDLM (kuleshov-group/mdlm) checkpoint and turn it into an FP-MDLM (arXiv 2605.31215, §3.4).

The import, and where the next steps live:

1. `load_mdlm_checkpoint(path_or_repo_id)` reads an MDLM checkpoint (a Hub-format folder or repo id with
   `config.json` + `model.safetensors`, a single `.safetensors` file, or a Lightning `.ckpt`, EMA weights by
   default) into an [`FPMGMForMaskedGeneration`] with `num_fp_layers=0`: a plain DiT stack whose logits
   match MDLM's fp32 forward.
2. `fpmgm_hf.conversion.layer_mapping.map_layers(mdlm_model, mapping=(1, 6, 12), ...)` builds the fixed-point model
   from chosen layers, and `linear_cka_matrix` / `pick_mapping_from_cka` choose them (`--map auto`).

Checkpoint layout (MDLM `models/dit.py`, all keys under `backbone.`): `vocab_embed.embedding` (a raw
parameter), `sigma_map.mlp.{0,2}.{weight,bias}`, `rotary_emb.inv_freq` (a persistent buffer, recomputed by
our model and therefore only checked), `blocks.{i}.{norm1, attn_qkv, attn_out, norm2, mlp.0, mlp.2,
adaLN_modulation}` and `output_layer.{norm_final, linear, adaLN_modulation}`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..configuration_fpmgm import FPMGMConfig
from ..modeling_fpmgm import FPMGMForMaskedGeneration
from .checkpoint_pickle import UnsafeCheckpointError, load_checkpoint, to_plain

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

__all__ = [
    "MDLM_KEY_MAP",
    "MDLMCheckpointError",
    "convert_mdlm_state_dict",
    "expected_inv_freq",
    "load_mdlm_checkpoint",
    "mdlm_config_to_fpmgm",
    "mdlm_parameter_names",
]


class MDLMCheckpointError(ValueError):
    """An MDLM checkpoint could not be read or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------------------------- key map

# Declarative MDLM -> FP-MGM key map: (full-match regex on the MDLM key, replacement template or None).
# `None` drops the key (after a check, see `convert_mdlm_state_dict`). The first matching row wins.
# MDLM blocks all land in `model.pre_blocks` (with num_fp_layers=0 our model is a plain stack).
_BLOCK_PARAM = r"(norm1\.weight|norm2\.weight|mlp\.[02]\.(?:weight|bias)|adaLN_modulation\.(?:weight|bias))"
MDLM_KEY_MAP: tuple[tuple[str, Optional[str]], ...] = (
    (r"backbone\.vocab_embed\.embedding", "model.embed_tokens.weight"),
    (r"backbone\.sigma_map\.mlp\.([02])\.(weight|bias)", r"model.conditioning.sigma_map.mlp.\1.\2"),
    (r"backbone\.rotary_emb\.inv_freq", None),
    (r"backbone\.blocks\.(\d+)\.attn_(qkv|out)\.weight", r"model.pre_blocks.\1.attn.attn_\2.weight"),
    (rf"backbone\.blocks\.(\d+)\.{_BLOCK_PARAM}", r"model.pre_blocks.\1.\2"),
    (r"backbone\.output_layer\.(norm_final\.weight|linear\.(?:weight|bias)|adaLN_modulation\.(?:weight|bias))",
     r"lm_head.\1"),
)
_COMPILED_KEY_MAP = tuple((re.compile(pattern), target) for pattern, target in MDLM_KEY_MAP)
# Prefixes some training wrappers put in front of the `backbone.` keys (torch.compile, DDP).
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_ROTARY_BASE = 10000.0


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def expected_inv_freq(head_dim: int, base: float = _ROTARY_BASE) -> Tensor:
    """MDLM's rotary buffer: `1 / base ** (arange(0, head_dim, 2) / head_dim)`, shape `(head_dim // 2,)`."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _check_inv_freq(key: str, value: Tensor, head_dim: Optional[int]) -> None:
    """Our model recomputes the rotary frequencies; refuse a checkpoint whose buffer differs."""
    if value.dim() != 1:
        raise MDLMCheckpointError(f"`{key}` must be 1-D, got shape {tuple(value.shape)}.")
    hd = 2 * value.numel()
    if head_dim is not None and hd != head_dim:
        raise MDLMCheckpointError(
            f"`{key}` has {value.numel()} frequencies (head dim {hd}) but the config's head dim is {head_dim}: "
            "n_heads does not match the checkpoint."
        )
    want = expected_inv_freq(hd)
    # Compared in fp32; a half-precision checkpoint stores the buffer rounded to its dtype (relative error
    # up to eps/2), which is not a different rotary scheme.
    eps = torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0
    err = ((value.float().cpu() - want).abs() / want).max().item()
    if not err <= max(eps, 1e-6):
        raise MDLMCheckpointError(
            f"rotary mismatch: `{key}` differs from 1/10000^(arange(0,{hd},2)/{hd}) (max relative diff {err:.3g}, "
            f"allowed {max(eps, 1e-6):.3g} for {value.dtype}); this model recomputes rotary embeddings with base "
            "10000 over the full head dim and cannot reproduce this checkpoint."
        )


def _convert(state_dict: Mapping[str, Tensor], head_dim: Optional[int]) -> tuple[dict[str, Tensor], list[str]]:
    """(renamed tensors, keys that match no row of the key map)."""
    out: dict[str, Tensor] = {}
    unexpected = []
    for raw_key, value in state_dict.items():
        key = _strip_wrappers(raw_key)
        for pattern, target in _COMPILED_KEY_MAP:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if target is None:
                _check_inv_freq(raw_key, value, head_dim)
            else:
                new_key = match.expand(target)
                if new_key in out:
                    raise MDLMCheckpointError(f"two checkpoint keys map to `{new_key}` (second: `{raw_key}`).")
                out[new_key] = value
            break
        else:
            unexpected.append(raw_key)
    return out, sorted(unexpected)


def convert_mdlm_state_dict(
    state_dict: Mapping[str, Tensor], head_dim: Optional[int] = None, strict: bool = True
) -> dict[str, Tensor]:
    """Rename MDLM `backbone.*` keys to FP-MGM keys (num_fp_layers=0, every block in `model.pre_blocks`).

    Args:
        state_dict: MDLM tensors (HF `model.safetensors`, Lightning `state_dict`, or EMA weights by name);
            `_orig_mod.` / `module.` wrapper prefixes are ignored.
        head_dim: if given, `backbone.rotary_emb.inv_freq` must have `head_dim // 2` entries.
        strict: raise [`MDLMCheckpointError`] on keys that match no row of `MDLM_KEY_MAP`; otherwise
            they are skipped with a warning.

    `backbone.rotary_emb.inv_freq` is dropped after checking that it equals
    `1 / 10000 ** (arange(0, hd, 2) / hd)`; a different buffer raises.
    """
    out, unexpected = _convert(state_dict, head_dim)
    if unexpected:
        msg = f"unexpected keys (not part of an MDLM DiT backbone): {unexpected}"
        if strict:
            raise MDLMCheckpointError(msg)
        warnings.warn(msg, stacklevel=2)
    return out


def mdlm_parameter_names(n_blocks: int, prefix: str = "backbone.") -> list[str]:
    """Names of MDLM's parameters in `backbone.parameters()` order: the order of an EMA `shadow_params` list."""
    names = [f"{prefix}vocab_embed.embedding"]
    names += [f"{prefix}sigma_map.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    block = ["norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight", "mlp.0.bias",
             "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias"]
    names += [f"{prefix}blocks.{i}.{p}" for i in range(n_blocks) for p in block]
    names += [f"{prefix}output_layer.{p}" for p in ("norm_final.weight", "linear.weight", "linear.bias",
                                                     "adaLN_modulation.weight", "adaLN_modulation.bias")]
    return names


# ---------------------------------------------------------------------------------------------- config

_FLAT_FIELDS = {  # MDLM HF config.json field -> FPMGMConfig field
    "hidden_dim": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_blocks": "num_pre_layers",
    "cond_dim": "cond_dim",
    "vocab_size": "vocab_size",
    "model_length": "max_position_embeddings",
    "dropout": "dropout",
    "time_conditioning": "time_conditioning",
}
_LIGHTNING_MODEL_FIELDS = {  # Lightning `config.model` (configs/model/*.yaml) field -> FPMGMConfig field
    "hidden_size": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_blocks": "num_pre_layers",
    "cond_dim": "cond_dim",
    "length": "max_position_embeddings",
    "dropout": "dropout",
}


def mdlm_config_to_fpmgm(cfg_dict: Optional[Mapping[str, Any]] = None, **overrides) -> FPMGMConfig:
    """An [`FPMGMConfig`] (num_fp_layers=0, every MDLM block a pre block) from an MDLM config.

    Accepts the Hub `config.json` fields (`hidden_dim, n_heads, n_blocks, cond_dim, vocab_size,
    model_length, dropout, time_conditioning`) or a Lightning hyper-parameter config (`model.hidden_size`,
    `model.length`, ..., top-level `time_conditioning`; its vocab size is not stored, so it comes from
    `overrides` or from the checkpoint's embedding shape). `cond_dim` is taken from the file: the
    upstream `MDLMConfig` class default (129) is wrong. `mask_token_id` is `vocab_size - 1`.
    `overrides` are FPMGMConfig fields and win over the file.
    """
    cfg = to_plain(dict(cfg_dict or {}))
    fields: dict[str, Any] = {}
    if isinstance(cfg.get("model"), dict):  # Lightning hyper_parameters['config']
        for src, dst in _LIGHTNING_MODEL_FIELDS.items():
            if src in cfg["model"]:
                fields[dst] = cfg["model"][src]
        if "time_conditioning" in cfg:
            fields["time_conditioning"] = cfg["time_conditioning"]
        if "vocab_size" in cfg:
            fields["vocab_size"] = cfg["vocab_size"]
    else:
        for src, dst in _FLAT_FIELDS.items():
            if src in cfg:
                fields[dst] = cfg[src]
    fields.update(overrides)
    if "vocab_size" not in fields:
        raise MDLMCheckpointError("the MDLM config has no `vocab_size`; pass vocab_size=... explicitly.")
    for name in ("hidden_size", "num_attention_heads", "num_pre_layers", "cond_dim"):
        if name not in fields:
            raise MDLMCheckpointError(f"the MDLM config does not give `{name}`; pass {name}=... explicitly.")
    if isinstance(fields.get("dropout"), int) and not isinstance(fields.get("dropout"), bool):
        fields["dropout"] = float(fields["dropout"])
    fields.setdefault("mask_token_id", int(fields["vocab_size"]) - 1)
    fields.setdefault("num_fp_layers", 0)
    fields.setdefault("num_post_layers", 0)
    fields.setdefault("tie_word_embeddings", False)
    return FPMGMConfig(**fields)


def _infer_config_fields(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Config fields readable from tensor shapes alone (heads come from the rotary buffer)."""
    sd = {_strip_wrappers(k): v for k, v in sd.items()}
    fields: dict[str, Any] = {}
    emb = sd.get("backbone.vocab_embed.embedding")
    if emb is not None:
        fields["vocab_size"], fields["hidden_size"] = int(emb.shape[0]), int(emb.shape[1])
    cond = sd.get("backbone.sigma_map.mlp.2.weight")
    if cond is not None:
        fields["cond_dim"] = int(cond.shape[0])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))}
    if blocks:
        fields["num_pre_layers"] = max(blocks) + 1
    inv = sd.get("backbone.rotary_emb.inv_freq")
    if inv is not None and emb is not None and inv.numel() and emb.shape[1] % (2 * inv.numel()) == 0:
        fields["num_attention_heads"] = int(emb.shape[1]) // (2 * inv.numel())
    return fields


# --------------------------------------------------------------------------------------------- reading

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _check_tensors(path: Path, where: str, entries: Mapping) -> dict[str, Tensor]:
    """`entries` as a dict after checking that it is a mapping of finite tensors (`where` names it in `path`)."""
    if not isinstance(entries, Mapping):
        raise MDLMCheckpointError(f"{path}: `{where}` is a {type(entries).__name__}, not a mapping of tensors.")
    for key, value in entries.items():
        if not isinstance(value, Tensor):
            raise MDLMCheckpointError(f"{path}: `{where}` entry `{key}` is a {type(value).__name__}, not a tensor.")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise MDLMCheckpointError(f"{path}: tensor `{key}` holds {bad} non-finite values (NaN/inf): a diverged "
                                      "or corrupt checkpoint; refusing to import it.")
    return dict(entries)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ... all mean an unreadable file
        raise MDLMCheckpointError(f"could not read safetensors file {path}: {err} (truncated or corrupt?)") from err
    return _check_tensors(path, "tensors", tensors)


def _read_config(config_file: Path) -> dict:
    if not config_file.is_file():
        return {}
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MDLMCheckpointError(f"could not parse {config_file}: {err}") from err
    if not isinstance(cfg, dict):
        raise MDLMCheckpointError(f"{config_file} holds a JSON {type(cfg).__name__}, not an object of config fields.")
    return cfg


def _read_folder(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    cfg = _read_config(folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MDLMCheckpointError(f"{folder} holds no *.safetensors file (expected MDLM's model.safetensors).")
    sd: dict[str, Tensor] = {}
    for f in files:
        sd.update(_read_safetensors(f))
    return cfg, sd


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors"]))
    except Exception as err:  # noqa: BLE001 - offline, not found, auth: one clear message
        raise MDLMCheckpointError(
            f"`{repo_id}` is not a local path and could not be downloaded from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). If the Hub is unreachable (or HF_HUB_OFFLINE=1 without a cache), "
            "download config.json and model.safetensors elsewhere and pass the folder."
        ) from err


def _torch_load(path: Path, trust_pickle: bool) -> dict:
    """The checkpoint's objects, read without running code from it (`checkpoint_pickle.load_checkpoint`)."""
    try:
        return load_checkpoint(path, trust_pickle=trust_pickle)
    except UnsafeCheckpointError as err:
        raise MDLMCheckpointError(str(err)) from err
    except Exception as err:  # noqa: BLE001 - a zip, pickle or storage error: an unreadable file
        raise MDLMCheckpointError(f"could not read checkpoint file {path}: {err} (truncated or corrupt?)") from err


def _lightning_config(path: Path, ckpt: dict) -> dict:
    """`hyper_parameters['config']` as plain dicts ({} when absent)."""
    hparams = ckpt.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        raise MDLMCheckpointError(f"{path}: `hyper_parameters` is a {type(hparams).__name__}, not a mapping.")
    try:
        cfg = to_plain(hparams.get("config") or {})
    except ValueError as err:
        raise MDLMCheckpointError(f"{path}: `hyper_parameters.config` refused: {err}.") from None
    if not isinstance(cfg, dict):
        raise MDLMCheckpointError(f"{path}: `hyper_parameters.config` is a {type(cfg).__name__}, not a mapping.")
    return cfg


def _shadow_params(path: Path, ckpt: dict) -> list[Tensor]:
    ema = ckpt.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if shadow is None:
        raise MDLMCheckpointError(f"{path} has no EMA weights (`ckpt['ema']['shadow_params']`); pass ema=False.")
    if not isinstance(shadow, (list, tuple)):
        raise MDLMCheckpointError(f"{path}: `ema.shadow_params` is a {type(shadow).__name__}, not a list of tensors.")
    return list(_check_tensors(path, "ema.shadow_params", dict(enumerate(shadow))).values())


def _read_lightning(path: Path, ema: bool, trust_pickle: bool = False) -> tuple[dict, dict[str, Tensor]]:
    ckpt = _torch_load(path, trust_pickle)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise MDLMCheckpointError(f"{path} is not a Lightning checkpoint (no `state_dict` entry).")
    cfg = _lightning_config(path, ckpt)
    sd = _check_tensors(path, "state_dict", ckpt["state_dict"])
    if not ema:
        return cfg, sd
    shadow = _shadow_params(path, ckpt)
    pattern = re.compile(r"(?:_orig_mod\.|module\.)*backbone\.blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    n_blocks = max(blocks) + 1 if blocks else (len(shadow) - 10) // 10
    names = mdlm_parameter_names(n_blocks)
    if len(shadow) != len(names):
        raise MDLMCheckpointError(
            f"{path}: EMA has {len(shadow)} shadow parameters, but an MDLM DiT with {n_blocks} blocks has "
            f"{len(names)} parameters."
        )
    plain = {_strip_wrappers(k): v for k, v in sd.items()}
    ema_sd: dict[str, Tensor] = {}
    for name, value in zip(names, shadow, strict=True):
        if name in plain and tuple(plain[name].shape) != tuple(value.shape):
            raise MDLMCheckpointError(
                f"{path}: EMA shadow parameter for `{name}` has shape {tuple(value.shape)} but the state_dict "
                f"has {tuple(plain[name].shape)}; the shadow list is not in backbone.parameters() order."
            )
        ema_sd[name] = value
    for key, value in plain.items():  # buffers (the rotary inv_freq) are not in the EMA
        if key.startswith("backbone.") and key not in ema_sd:
            ema_sd[key] = value
    return cfg, ema_sd


def read_mdlm_checkpoint(
    path_or_repo_id: Union[str, os.PathLike], ema: bool = True, trust_pickle: bool = False
) -> tuple[dict, dict[str, Tensor]]:
    """(config dict, MDLM state dict) from a folder, repo id, `.safetensors` file or Lightning `.ckpt`; a `.ckpt`
    is read without running code from it unless `trust_pickle=True` (see `fpmgm_hf.conversion.checkpoint_pickle`)."""
    source = str(path_or_repo_id)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return _read_config(path.with_name("config.json")), _read_safetensors(path)
        return _read_lightning(path, ema, trust_pickle)
    looks_local = source.startswith((".", "/", "~")) or source.endswith((".ckpt", ".safetensors", ".pt"))
    if looks_local or not _REPO_ID.match(source):
        raise FileNotFoundError(
            f"MDLM checkpoint `{source}` does not exist: pass a folder with config.json + model.safetensors, "
            "a Lightning .ckpt file, or a Hub repo id such as kuleshov-group/mdlm-owt."
        )
    return _read_folder(_download(source))


def _load_strict(
    model: torch.nn.Module, mapped: Mapping[str, Tensor], source: str, unmapped: Sequence[str] = ()
) -> None:
    """Copy `mapped` into `model`, reporting missing, unexpected and shape-mismatched keys together.
    `unmapped` are checkpoint keys the key map did not recognise (reported as unexpected)."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in mapped)
    unexpected = sorted(list(unmapped) + [k for k in mapped if k not in own])
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"cannot load MDLM checkpoint `{source}` into {type(model).__name__}:"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
        raise MDLMCheckpointError("\n  ".join(parts))
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value.to(own[key].dtype))


def load_mdlm_checkpoint(
    path_or_repo_id: Union[str, os.PathLike], ema: bool = True, trust_pickle: bool = False, **config_overrides
) -> FPMGMForMaskedGeneration:
    """Load an MDLM checkpoint as an [`FPMGMForMaskedGeneration`] with `num_fp_layers=0` (eval mode, fp32).

    Args:
        path_or_repo_id: a Hub-format folder (`config.json` with MDLM fields + `*.safetensors` with the
            `backbone.*` tensors), a Hub repo id (downloaded with `huggingface_hub.snapshot_download`), a
            single `.safetensors` file, a Lightning `.ckpt`, or an fpmgm_hf `save_pretrained` folder of an
            explicit stack (`num_fp_layers=0`, e.g. an MDLM trained with `fpmgm-train`).
        ema: for a `.ckpt`, use the EMA weights `ckpt['ema']['shadow_params']` (the ones MDLM evaluates
            with; default) instead of `ckpt['state_dict']`. Hub weights are a single set and ignore it.
        trust_pickle: UNSAFE. Read a `.ckpt` with full unpickling, which runs any code the file contains. By
            default only tensors, plain containers and Lightning's config / tokenizer objects are read (as inert
            stand-ins, `fpmgm_hf.conversion.checkpoint_pickle`), and any other Python global is refused by name.
        config_overrides: [`FPMGMConfig`] fields overriding the checkpoint's config (a `.ckpt` without
            `hyper_parameters['config']` is configured from tensor shapes plus these).

    Raises:
        FileNotFoundError: the path does not exist (and is not a Hub repo id).
        MDLMCheckpointError (a ValueError), naming the file and the entry: unreadable file or config, a pickled
            global outside the allow-list, a non-tensor entry, NaN/inf weights, failed download, missing /
            unexpected / shape-mismatched keys (all listed), or a rotary buffer this model cannot reproduce.
    """
    source = str(path_or_repo_id)
    own = _own_stack(path_or_repo_id)
    if own is not None:
        return own
    cfg_dict, sd = read_mdlm_checkpoint(path_or_repo_id, ema=ema, trust_pickle=trust_pickle)
    try:
        inferred = _infer_config_fields(sd)
        if cfg_dict:
            from_shapes = {k: v for k, v in inferred.items() if k == "vocab_size" and "vocab_size" not in cfg_dict}
            config = mdlm_config_to_fpmgm(cfg_dict, **{**from_shapes, **config_overrides})
        else:
            config = mdlm_config_to_fpmgm({}, **{**inferred, **config_overrides})
        mapped, unmapped = _convert(sd, head_dim=config.head_dim)
    except ValueError as err:  # config fields (FPMGMConfig's checks) and key-map errors: say which checkpoint
        raise MDLMCheckpointError(f"{source}: {err}") from err
    model = FPMGMForMaskedGeneration(config)
    _load_strict(model, mapped, source, unmapped)
    model.config.name_or_path = source
    return model.eval()


def _own_stack(path) -> Optional[FPMGMForMaskedGeneration]:
    """An fpmgm_hf folder (model_type "fpmgm") holding an explicit stack, loaded as is; None otherwise."""
    if _read_config(Path(path) / "config.json").get("model_type") != "fpmgm":
        return None
    model = FPMGMForMaskedGeneration.from_pretrained(path, dtype=torch.float32)
    if model.config.num_fp_layers or model.config.num_post_layers:
        raise MDLMCheckpointError(
            f"{path} is an fpmgm_hf model with layers {model.config.num_pre_layers}/{model.config.num_fp_layers}/"
            f"{model.config.num_post_layers}; a conversion teacher must be an explicit stack (N/0/0)."
        )
    model.config.name_or_path = str(path)
    return model.eval()
