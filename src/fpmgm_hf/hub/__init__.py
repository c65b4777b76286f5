"""Model cards and Hub uploads.

Cards are rendered from the templates in `model_cards/` (YAML front matter + markdown) and never
hand-edited. `push_folder` uploads a finished `save_pretrained` folder with `create_repo` + `upload_folder`,
keeping our card (`model.push_to_hub` would replace README.md with a generic one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

TAGS = ["custom_code", "masked-diffusion", "fixed-point"]


def _template(kind: str, template_path: Optional[str]) -> Path:
    if not template_path:
        from importlib.resources import as_file, files

        with as_file(files(__name__) / "templates" / f"{kind}.md") as shipped:
            return Path(shipped)
    path = Path(template_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"model card template {str(path)!r} not found; pass `template_path=` "
            f"(the shipped ones are fpmgm_hf/hub/templates/{{text,image}}.md)."
        )
    return path


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
    template_path: Optional[str] = None,
    **extra: Any,
):
    """A `huggingface_hub.ModelCard` for `model` (an `FPMGMForMaskedGeneration`).

    Args:
        kind: "text" or "image" (picks `model_cards/{kind}.md`).
        settings: training / conversion settings, rendered as a table.
        results: a markdown evaluation table (say on what and how it was measured).
    """
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in ("text", "image"):
        raise ValueError(f"`kind`={kind!r} is invalid; allowed: ['text', 'image'].")
    c, g = model.config, model.generation_config
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="fill-mask" if kind == "text" else "unconditional-image-generation",
        tags=TAGS + ([] if kind == "text" else ["image-generation"]),
        license=license,
        base_model=base_model,
        datasets=datasets,
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
        base_model=base_model,
        settings=settings or {},
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
    return ModelCard.from_template(data, template_path=str(_template(kind, template_path)), **fields)


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
