"""Model cards and Hub uploads, shared by every exit: `fpmgm-train` / image training (`training.export`) and the
converter (`fpmgm-convert`).

Cards are rendered from the templates shipped in this package (`fpmgm_hf/hub/templates/{text,image}.md`, read
with `importlib.resources`, so they work from a wheel) and never hand-edited. What goes into a card is public:
`base_model` is set only for a Hub model id (a local source is named without a link), settings that are local
paths are reduced to their last component, and the usage snippet is the one a test runs. `push_folder` uploads a
finished `save_pretrained` folder with `create_repo` + `upload_folder`, keeping our card (`model.push_to_hub`
would replace README.md with a generic one).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

TAGS = ["custom_code", "masked-diffusion", "fixed-point"]
KINDS = ("text", "image")
# A Hub model id: "name" (legacy canonical repos such as gpt2) or "namespace/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_FILE_SUFFIXES = (".ckpt", ".safetensors", ".bin", ".pt", ".pth", ".txt", ".json", ".jsonl", ".md")


def hub_model_id(source: Optional[str]) -> Optional[str]:
    """`source` when it names a Hub model (`org/name`, or a legacy `name`), None for a local file or folder
    (anything that exists here, or looks like a path or a file name)."""
    if not source or os.path.exists(source) or source.startswith((".", "~", os.sep)):
        return None
    if source.endswith(_FILE_SUFFIXES) or not _HUB_ID.fullmatch(source):
        return None
    return source


def source_label(source: str) -> str:
    """What a card may say about a source: a Hub id as is, a local path by its last component."""
    return hub_model_id(source) or Path(os.path.normpath(str(source))).name


def public_value(value: Any) -> Any:
    """`value` with local paths reduced to their last component (comma-separated lists item by item); numbers,
    names and Hub ids unchanged."""
    if isinstance(value, (list, tuple)):
        return type(value)(public_value(v) for v in value)
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = str(value)
    items = text.split(",")
    if not any(os.path.isabs(i.strip()) or os.sep in i or os.path.exists(i.strip()) for i in items):
        return text
    return ",".join(source_label(i.strip()) if i.strip() else i for i in items)


def public_settings(settings: Optional[dict]) -> dict:
    return {k: public_value(v) for k, v in (settings or {}).items()}


def _template_text(kind: str, template_path: Optional[str]) -> str:
    if not template_path:
        from importlib.resources import files

        return (files(__name__) / "templates" / f"{kind}.md").read_text(encoding="utf-8")
    path = Path(template_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {str(path)!r} not found; pass `template_path=` "
            f"(the shipped ones are fpmgm_hf/hub/templates/{{text,image}}.md)."
        )
    return path.read_text(encoding="utf-8")


def render_model_card(
    model,
    *,
    kind: str = "text",
    repo_id: str = "your-name/your-model",
    revision: str = "main",
    base_model: Optional[str] = None,
    datasets: Optional[list] = None,
    license: str = "apache-2.0",
    settings: Optional[dict] = None,
    results: str = "",
    provenance: Optional[str] = None,
    adapter: bool = False,
    template_path: Optional[str] = None,
    **extra: Any,
):
    """A `huggingface_hub.ModelCard` for `model` (an `FPMGMForMaskedGeneration`).

    Args:
        kind: "text" or "image" (picks `templates/{kind}.md`).
        base_model: the source model. A Hub id becomes the `base_model` metadata and a link; a local file or
            folder is named by its last component, without metadata or link.
        datasets: Hub dataset ids for the metadata (local files are left out).
        settings: training / conversion settings, rendered as a table (local paths reduced to their name).
        results: a markdown evaluation table (say on what and how it was measured).
        provenance: one sentence on how the model was made (default: from `base_model`).
        adapter: the folder holds a PEFT adapter beside the base weights; the snippet loads it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in KINDS:
        raise ValueError(f"`kind`={kind!r} is invalid; allowed: {list(KINDS)}.")
    c, g = model.config, model.generation_config
    hub_base = hub_model_id(base_model)
    if provenance is None and base_model:
        provenance = (f"Converted from [`{hub_base}`](https://huggingface.co/{hub_base})." if hub_base
                      else f"Converted from a local checkpoint (`{source_label(base_model)}`).")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="fill-mask" if kind == "text" else "unconditional-image-generation",
        tags=TAGS + ([] if kind == "text" else ["image-generation"]) + (["peft", "lora"] if adapter else []),
        license=license,
        base_model=hub_base,
        datasets=[d for d in datasets if hub_model_id(d)] or None if datasets else None,
    )
    fields = {
        k: getattr(c, k)
        for k in (
            "num_pre_layers",
            "num_fp_layers",
            "num_post_layers",
            "hidden_size",
            "num_attention_heads",
            "cond_dim",
            "injection",
            "fp_solver",
            "fp_max_iter",
            "fp_tol",
            "num_classes",
            "position_encoding",
        )
    }
    fields.update(
        model_name=repo_id.split("/")[-1],
        model_kind="FP-MDLM" if c.num_fp_layers else "MDLM baseline",
        repo_id=repo_id,
        revision=revision,
        provenance=provenance or "",
        adapter=adapter,
        settings=public_settings(settings),
        results=results,
        nograd=tuple(c.fp_train_nograd_iters),
        grad=tuple(c.fp_train_grad_iters),
        seq_len=c.max_position_embeddings,
        sampler=g.sampler,
        reuse=g.reuse,
        fp_schedule=g.fp_schedule,
        num_parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M",
        grid="x".join(map(str, c.grid_size)) if c.grid_size else "1-D",
    )
    fields.update(extra)
    return ModelCard.from_template(data, template_str=_template_text(kind, template_path), **fields)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: str = "Upload FP-MGM",
    token: Optional[str] = None,
    api=None,
) -> str:
    """Upload a finished folder (weights, code, configs, tokenizer, README.md) to the Hub; returns the commit URL.

    `api` defaults to `huggingface_hub.HfApi(token=token)`; tests pass a mock.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a save_pretrained folder (no config.json).")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message
    )
    return str(getattr(info, "commit_url", info))
