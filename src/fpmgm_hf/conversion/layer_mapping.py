"""From a pretrained plain stack (an imported MDLM) to an FP-MGM: layer mapping and the layer CKA that chooses it.

`map_layers(mdlm_model, mapping=(1, 6, 12), ...)` builds the fixed-point model from chosen layers (layer 1 ->
pre block, layer 6 -> shared block, layer 12 -> post block in the paper), with the input injection close to
the identity so that one solver iteration reproduces the chosen layers. `linear_cka_matrix` /
`pick_mapping_from_cka` choose the mapping from the residual-stream similarity of the pretrained layers
(`--map auto` of `conversion/convert.py`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Union

import torch

from ..configuration_fpmgm import FPMGMConfig
from ..modeling_fpmgm import FPMGMForMaskedGeneration

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

__all__ = ["linear_cka", "linear_cka_matrix", "map_layers", "parse_mapping", "pick_mapping_from_cka", "save_cka_png"]


# ------------------------------------------------------------------------------------------ layer mapping


def _teacher_blocks(model: FPMGMForMaskedGeneration) -> list:
    if model.config.num_fp_layers:
        raise ValueError("map_layers/linear CKA need a plain stack (num_fp_layers=0), e.g. from load_mdlm_checkpoint.")
    return list(model.model.pre_blocks) + list(model.model.post_blocks)


def parse_mapping(mapping: Union[str, Sequence[int]], num_layers: int, expected_len: int) -> list[int]:
    """Validate a 1-based layer mapping such as "1,6,12"; errors name the `--map` flag and the valid range."""
    hint = (f"--map expects {expected_len} comma-separated 1-based layer indices (num_pre + num_fp + num_post), "
            f"each in [1, {num_layers}]")
    try:
        if isinstance(mapping, str):
            ids = [int(s) for s in mapping.replace(" ", "").split(",") if s != ""]
        else:
            ids = [int(i) for i in mapping]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{hint}; got {mapping!r}.") from err
    if len(ids) != expected_len:
        raise ValueError(f"{hint}; got {len(ids)} indices: {mapping!r}.")
    bad = [i for i in ids if not 1 <= i <= num_layers]
    if bad:
        raise ValueError(f"{hint}; out of range: {bad}.")
    return ids


def map_layers(
    mdlm_model: FPMGMForMaskedGeneration,
    mapping: Union[str, Sequence[int]] = (1, 6, 12),
    num_pre: int = 1,
    num_fp: int = 1,
    num_post: int = 1,
    injection: str = "constrained",
    seed: Optional[int] = 0,
    **config_overrides,
) -> FPMGMForMaskedGeneration:
    """Build an FP-MDLM from chosen layers of a plain MDLM stack (arXiv 2605.31215 §3.4, App. C.3.2).

    `mapping` lists `num_pre + num_fp + num_post` 1-based layer ids: the first `num_pre` become the pre
    blocks, the next `num_fp` the shared fixed-point block(s), the last `num_post` the post blocks ("1,6,12":
    layer 1 -> pre, 6 -> shared, 12 -> post). Embeddings, conditioning and the output head are copied.
    The injection gets `FPMGMInjection.reset_identity()` (seeded by `seed`, None = global RNG): with one
    solver iteration from `z0 = h_pre`, the converted model computes the chosen layers in sequence, exactly
    with the default `constrained` injection (`A h + (1 - A) I h = h`), and up to the small random weights that
    read `G(h_pre)` with `concat_mlp` (about 2.4% of the input at width 64, 29% at 768: see docs/stability).
    """
    blocks = _teacher_blocks(mdlm_model)
    ids = parse_mapping(mapping, len(blocks), num_pre + num_fp + num_post)
    fields = mdlm_model.config.to_dict()
    drop = ("architectures", "auto_map", "_name_or_path", "transformers_version", "model_type", "dtype", "torch_dtype")
    for key in [*drop, *(k for k in fields if k.startswith("fp_"))]:  # a plain stack's fp_* fields mean nothing:
        fields.pop(key, None)  # the converted model gets the defaults of the fixed-point map unless overridden
    fields.update(num_pre_layers=num_pre, num_fp_layers=num_fp, num_post_layers=num_post, injection=injection)
    fields.update(config_overrides)
    config = FPMGMConfig(**fields)
    ref = mdlm_model.model.embed_tokens.weight
    student = FPMGMForMaskedGeneration(config).to(device=ref.device, dtype=ref.dtype)
    src, dst = mdlm_model.model, student.model
    with torch.no_grad():
        dst.embed_tokens.load_state_dict(src.embed_tokens.state_dict())
        dst.conditioning.load_state_dict(src.conditioning.state_dict())
        student.lm_head.load_state_dict(mdlm_model.lm_head.state_dict())
        targets = list(dst.pre_blocks) + list(dst.fp_blocks) + list(dst.post_blocks)
        for target, layer in zip(targets, ids, strict=True):
            target.load_state_dict(blocks[layer - 1].state_dict())
        if dst.injection is not None:
            if seed is None:
                dst.injection.reset_identity()
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    dst.injection.reset_identity()
    student.config.name_or_path = mdlm_model.config.name_or_path
    return student.train(mdlm_model.training)


# ------------------------------------------------------------------------------------------------- CKA


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two feature matrices `(n, d1)`, `(n, d2)` (rows = tokens), in float64."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(cross / norm.clamp_min(1e-300))


@torch.no_grad()
def block_outputs(model: FPMGMForMaskedGeneration, input_ids: Tensor, **forward_kwargs) -> list[Tensor]:
    """Residual stream after every block call, in call order (a shared block contributes each iteration)."""
    outputs: list[Tensor] = []
    inner = model.model
    handles = [
        block.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
        for block in list(inner.pre_blocks) + list(inner.fp_blocks) + list(inner.post_blocks)
    ]
    try:
        model(input_ids, return_dict=True, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return outputs


@torch.no_grad()
def linear_cka_matrix(model: FPMGMForMaskedGeneration, input_ids: Tensor, **forward_kwargs) -> Tensor:
    """Linear CKA `(L, L)` between the residual streams after each of the L block calls.

    `input_ids (B, S)` are flattened to B*S token rows. For an MDLM stack, L is the number of layers;
    feed masked inputs (several noise levels averaged, as the paper does) to study the denoiser's regime.
    """
    was_training = model.training
    model.eval()
    try:
        feats = [h.reshape(-1, h.shape[-1]) for h in block_outputs(model, input_ids, **forward_kwargs)]
    finally:
        model.train(was_training)
    n = len(feats)
    cka = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            cka[i, j] = cka[j, i] = linear_cka(feats[i], feats[j])
    return cka


def pick_mapping_from_cka(cka: Tensor, num_pre: int = 1, num_fp: int = 1, num_post: int = 1) -> list[int]:
    """Choose a 1-based layer mapping from a layer CKA matrix.

    Rule (paper App. C.3.1-C.3.2): the boundary between the "early" and the self-similar "late" group is
    where consecutive-layer CKA `cka[i, i+1]` is lowest (the largest drop; 0.162 between layers 5 and 6 of
    MDLM-OWT). Then:
      * pre blocks: the first `num_pre` layers (1, ..., num_pre);
      * shared block(s): `num_fp` consecutive layers starting at the first layer of the late group;
      * post blocks: the last `num_post` layers.
    The shared start is clamped so the three groups stay in order without overlap. On MDLM-OWT this
    gives 1,6,12.
    """
    L = cka.shape[0]
    if cka.dim() != 2 or cka.shape[1] != L:
        raise ValueError(f"`cka` must be a square (L, L) matrix, got {tuple(cka.shape)}.")
    if num_pre + num_fp + num_post > L:
        raise ValueError(f"--map auto: num_pre + num_fp + num_post = {num_pre + num_fp + num_post} > {L} layers.")
    if L < 2:
        return list(range(1, L + 1))
    consecutive = torch.stack([cka[i, i + 1] for i in range(L - 1)])
    late_start = int(torch.argmin(consecutive)) + 2  # 1-based first layer after the drop
    start = min(max(late_start, num_pre + 1), L - num_post - num_fp + 1)
    return list(range(1, num_pre + 1)) + list(range(start, start + num_fp)) + list(range(L - num_post + 1, L + 1))


def save_cka_png(cka: Tensor, path: Union[str, os.PathLike], title: str = "linear CKA between layers") -> bool:
    """Save the CKA matrix as a heat map if matplotlib is installed; returns whether a file was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - optional dependency
        logger.info("matplotlib is not installed; skipping %s", path)
        return False
    L = cka.shape[0]
    fig, ax = plt.subplots(figsize=(4 + 0.25 * L, 3.5 + 0.25 * L))
    im = ax.imshow(cka.float().numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    ticks = list(range(L))
    ax.set_xticks(ticks, [str(i + 1) for i in ticks])
    ax.set_yticks(ticks, [str(i + 1) for i in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return True

