"""Class-conditional image training (FP-MaskGIT / MaskGIT) on VQ token grids, with the machinery of `train.py`.

    python -m fpmgm_hf.images.train --data mnist --preset fp-maskgit-tiny --max-steps 2000 --out runs/img-fp
    python -m fpmgm_hf.training.train --modality image --data mnist --preset maskgit-tiny-12 --out runs/img-12
    python -m fpmgm_hf.images.train --from runs/img-fp/final --data mnist --consistency-weight 0.1 \
        --consistency-warmup 200 --max-steps 3000 --out runs/img-cofre          # CoFRe consistency stage

Data: a `.npz` from `python -m fpmgm_hf.images.vq encode` (`tokens` uint16 (N, rows, cols), `labels` int64 (N,)), or
`mnist` / `fashion_mnist`, meaning `outputs/vq/codes/<name>_train.npz` (validation: `<name>_test.npz`). Tokens
are flattened row-major to `rows*cols` ids; the model's vocabulary is `codebook_size + 1` with the mask id
`codebook_size`. The loss is MaskGIT's masked cross-entropy (`objectives.maskgit_loss`) with label dropout
(classifier-free guidance); S-JFB comes from the model's training mode. Validation is the same masked
cross-entropy on the test split, from a fixed seed (logged as `val_ce`, and as `val_nelbo` / `val_ppl` so the
shared loop's printing and `--stop-ppl-rise` work unchanged).

The consistency stage (`--consistency-weight > 0`) follows CoFRe: nested student/teacher masks
(`objectives.nested_masks`, MDLM schedule: mask ratio t ~ U[eps, 1], teacher at t - delta, teacher ⊆ student),
a no-grad eval-mode teacher on the cleaner canvas, and a squared distance between the final hidden states at
the student-masked positions, ramped by `consistency_weight_at`. Two MaskGIT-specific changes: the task term
is MaskGIT's unweighted masked CE of the student logits (not the MDLM NELBO's 1/t weighting), and the distance
is `objectives.hidden_consistency` (layer-normalised states, as for text): after a few hundred MNIST steps the
FP block is not contractive and the raw states grow from ~1e2 to ~1e7 in norm between 1 and 16 eval
iterations (the logits, behind the final LayerNorm, barely change), which made a raw squared distance ~1e8.
Labels (after dropout) go to both branches.

The export (`OUT/final`) is a `save_pretrained` folder whose generation config defaults to MaskGIT sampling
(confidence sampler, Halton order, 3SR, 49 tokens); `--vq DIR` is copied to `OUT/final/vq`, so
`VQVAEModel.from_pretrained(final, subfolder="vq")` loads the matching tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..scheduling_fpmgm import loglinear_sigma
from ..training.export import export
from ..training.loop import (
    Trainer,
    add_loop_arguments,
    begin,
    check_loop_args,
    make_accelerator,
    output_lock,
    run_loop,
    start_run,
)
from ..training.objectives import (
    _teacher_forward,
    consistency_weight_at,
    hidden_consistency,
    maskgit_loss,
    maskgit_masks,
    nested_masks,
)

_TINY = dict(hidden_size=128, num_attention_heads=4, cond_dim=64, dropout=0.0)
PRESETS = {
    "fp-maskgit-tiny": dict(_TINY, num_pre_layers=4, num_fp_layers=1, num_post_layers=4),
    "fp-maskgit-tiny-paper": dict(_TINY, num_pre_layers=4, num_fp_layers=1, num_post_layers=4, injection="concat_mlp",
                                  fp_residual_reg=0.0),
    "maskgit-tiny-12": dict(_TINY, num_pre_layers=12, num_fp_layers=0, num_post_layers=0),
    "maskgit-tiny-24": dict(_TINY, num_pre_layers=24, num_fp_layers=0, num_post_layers=0),
}
PRESETS["fp-maskgit-tiny-sn"] = dict(PRESETS["fp-maskgit-tiny-paper"], fp_state_norm=True)  # paper map + state norm
DATASETS = ("mnist", "fashion_mnist")
VQ_SUBFOLDER = "vq"
IMAGE_INFO_FILE = "image_info.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fpmgm-train --modality image", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", required=True, help="Token-grid .npz path, or 'mnist' / 'fashion_mnist' (outputs/vq/codes/).")
    a("--val-data", default=None,
      help="Validation .npz (default: the '_test' twin of a '_train' file, else the last --val-fraction).")
    a("--val-fraction", type=float, default=0.05, help="Held-out fraction when there is no validation file.")
    a("--vq", default=None, help="VQ tokenizer folder copied to OUT/final/vq (default: outputs/vq/<name>).")
    a("--out", required=True, help="Output folder: log.jsonl, checkpoints/step_N, final/.")
    a("--preset", choices=sorted(PRESETS), default="fp-maskgit-tiny", help="Model architecture preset.")
    a("--config", default=None, help="JSON file of FPMGMConfig fields replacing the preset's architecture.")
    a("--from", dest="init_from", default=None, help="Start from this save_pretrained folder (consistency stage).")
    a("--num-classes", type=int, default=None, help="Classes (default: max label + 1 of the training data).")
    a("--label-dropout", type=float, default=0.1, help="Probability of replacing a label by the null class.")
    a("--batch-size", type=int, default=32, help="Token grids per process per micro-batch.")
    add_loop_arguments(p)
    a("--eps", type=float, default=1e-3, help="Epsilon of the consistency stage's mask schedule.")
    a("--threads", type=int, default=None, help="torch.set_num_threads (e.g. 1 on a shared CPU).")
    return p


def _strip_modality(argv: list[str]) -> list[str]:
    """Drop `--modality image` / `--modality=image` so `train.py` can pass its argv through unchanged."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--modality":
            skip = True
            continue
        if item.startswith("--modality="):
            continue
        out.append(item)
    return out


def _check_args(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if not 0 <= args.label_dropout < 1:
        raise ValueError(f"--label-dropout must be in [0, 1), got {args.label_dropout}.")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}.")
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {args.num_classes}.")
    if args.config and args.init_from:
        raise ValueError("give either --config (a fresh model) or --from (a trained one), not both.")
    check_loop_args(args)
    for flag, path in (("--config", args.config), ("--from", args.init_from), ("--vq", args.vq)):
        if path and not os.path.exists(path):
            raise ValueError(f"{flag}: {path!r} does not exist.")


# ------------------------------------------------------------------------------------------------ data


def _find(rel: str) -> Optional[Path]:
    for root in (Path.cwd(), REPO_ROOT):
        if (root / rel).exists():
            return root / rel
    return None


def resolve_data(spec: str, val_spec: Optional[str] = None) -> tuple[Path, Optional[Path]]:
    """(train .npz, validation .npz or None) for a path or a dataset name."""
    if spec in DATASETS:
        train = _find(f"outputs/vq/codes/{spec}_train.npz")
        if train is None:
            raise ValueError(f"--data {spec!r}: outputs/vq/codes/{spec}_train.npz not found; create it with "
                             f"`python -m fpmgm_hf.images.vq encode --dataset {spec} --split train ...`.")
    else:
        train = Path(spec)
        if not train.is_file():
            raise ValueError(f"--data {spec!r} is neither {list(DATASETS)} nor an existing .npz file.")
    if val_spec is not None:
        val = Path(val_spec)
        if not val.is_file():
            raise ValueError(f"--val-data {val_spec!r} does not exist.")
        return train, val
    twin = train.with_name(train.name.replace("_train.npz", "_test.npz"))
    return train, (twin if twin != train and twin.is_file() else None)


def default_vq(spec: str) -> Optional[Path]:
    """`outputs/vq/<name>` for a dataset name or a `<name>_{train,test}.npz` path, when it exists."""
    name = Path(spec).name.rsplit("_", 1)[0] if spec.endswith(".npz") else spec
    return _find(f"outputs/vq/{name}") if name in DATASETS else None


def load_token_grids(path, grid_size=None, codebook_size: Optional[int] = None,
                     num_classes: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Load a token-grid `.npz`; returns `(tokens LongTensor (N, rows*cols), labels LongTensor (N,), info)`.

    Raises ValueError naming the problem for a missing key, a grid other than `grid_size`, an id outside
    `[0, codebook_size)` or a label outside `[0, num_classes)`. `info` holds `codebook_size` and `grid_size`."""
    with np.load(path) as d:
        for key in ("tokens", "labels"):
            if key not in d.files:
                raise ValueError(f"{path}: missing array {key!r} (found {d.files}).")
        tokens, labels = d["tokens"], d["labels"]
        stored_k = int(d["codebook_size"]) if "codebook_size" in d.files else None
    if tokens.ndim != 3:
        raise ValueError(f"{path}: `tokens` must have shape (N, rows, cols), got {tokens.shape}.")
    grid = tuple(int(v) for v in tokens.shape[1:])
    if grid_size is not None and grid != tuple(grid_size):
        raise ValueError(f"{path}: token grids are {grid[0]}x{grid[1]} but the model expects "
                         f"{grid_size[0]}x{grid_size[1]}.")
    if labels.shape != (tokens.shape[0],):
        raise ValueError(f"{path}: `labels` must have shape ({tokens.shape[0]},), got {labels.shape}.")
    k = codebook_size or stored_k or int(tokens.max()) + 1
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
        raise ValueError(f"{path}: token ids must lie in [0, {k}) (codebook size), got "
                         f"[{int(tokens.min())}, {int(tokens.max())}].")
    if num_classes is not None and labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{path}: class ids must lie in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}].")
    flat = torch.from_numpy(tokens.astype(np.int64)).reshape(tokens.shape[0], -1)
    return flat, torch.from_numpy(labels.astype(np.int64)), {"codebook_size": k, "grid_size": grid}


def pack(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows `[token ids..., label]`: the shared sampler, fingerprint and checkpoints see one tensor."""
    return torch.cat([tokens, labels[:, None]], dim=1)


def unpack(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[:, :-1], rows[:, -1]


# ----------------------------------------------------------------------------------------------- model


def image_model_fields(preset: str, codebook_size: int, grid_size, num_classes: int) -> dict:
    rows, cols = grid_size
    return dict(PRESETS[preset], vocab_size=codebook_size + 1, mask_token_id=codebook_size, num_classes=num_classes,
                position_encoding="rope_2d", grid_size=(rows, cols), max_position_embeddings=rows * cols)


def build_image_model(args, codebook_size: int, grid_size, num_classes: int):
    from .. import FPMGMConfig, FPMGMForMaskedGeneration

    want = {"vocab_size": codebook_size + 1, "mask_token_id": codebook_size, "num_classes": num_classes,
            "grid_size": tuple(grid_size), "position_encoding": "rope_2d"}
    if args.init_from:
        model = FPMGMForMaskedGeneration.from_pretrained(args.init_from)
        have = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                for k, v in ((k, getattr(model.config, k)) for k in want)}
        diffs = [f"{k}={have[k]!r} (data needs {v!r})" for k, v in want.items() if have[k] != v]
        if diffs:
            raise ValueError(f"--from {args.init_from}: model does not fit the data: " + ", ".join(diffs))
    else:
        fields = image_model_fields(args.preset, codebook_size, grid_size, num_classes)
        if args.config:
            with open(args.config) as f:
                arch = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
            fields.update({k: v for k, v in arch.items() if k not in want and k != "max_position_embeddings"})
        torch.manual_seed(args.seed)
        model = FPMGMForMaskedGeneration(FPMGMConfig(**fields))
    set_image_generation_defaults(model)
    return model


def set_image_generation_defaults(model) -> None:
    """MaskGIT sampling defaults saved with the model: confidence sampler, Halton order, 3SR, one grid."""
    from ..generation_fpmgm import FPMGMGenerationConfig

    rows, cols = model.config.grid_size
    model.generation_config = FPMGMGenerationConfig(
        seq_len=rows * cols, sampler="confidence", order="halton", reuse="3sr", randomness=1.0,
        mask_token_id=model.config.mask_token_id)


class ImageAssets:
    """Stands in for the text tokenizer of `train.export`: saves the VQ folder and the grid description."""

    def __init__(self, vq_dir: Optional[str], info: dict):
        self.vq_dir, self.info = vq_dir, info

    def save_pretrained(self, path: str) -> None:
        if self.vq_dir:
            shutil.copytree(self.vq_dir, os.path.join(path, VQ_SUBFOLDER), dirs_exist_ok=True)
        with open(os.path.join(path, IMAGE_INFO_FILE), "w") as f:
            json.dump(dict(self.info, vq_subfolder=VQ_SUBFOLDER if self.vq_dir else None), f, indent=1)


# --------------------------------------------------------------------------------------------- trainer


def masked_ce(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, int]:
    """Summed CE of `x0` at `masked` positions with the mask logit excluded, and the position count."""
    rows = logits[masked].float()
    rows[:, mask_id] = -math.inf
    return F.cross_entropy(rows, x0[masked], reduction="sum"), int(masked.sum())


class ImageTrainer(Trainer):
    """`Trainer` whose rows are `[49 token ids, label]`: MaskGIT loss with label dropout, masked-CE validation."""

    def loss(self, x0: torch.Tensor):
        a = self.args
        tokens, labels = unpack(x0)
        if a.consistency_weight <= 0:
            loss, _ = maskgit_loss(self.model, tokens, generator=self.generator, class_labels=labels,
                                   label_dropout=a.label_dropout, num_classes=self.num_classes)
            return loss, {}
        return self.consistency_loss(tokens, labels)

    def consistency_loss(self, tokens, labels):
        a = self.args
        drop = torch.rand(labels.shape, generator=self.generator).to(labels.device) < a.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        lam = consistency_weight_at(self.step, a.consistency_weight, a.consistency_warmup)
        model = self.acc.unwrap_model(self.model)
        mask_id = model.config.mask_token_id
        # The nested masks, student forward and no-grad eval-mode teacher of objectives.consistency_loss, with
        # MaskGIT's task term; the distance is objectives.hidden_consistency (layer-normalised states).
        z_s, z_c, t_s, t_c, student, _ = nested_masks(tokens, mask_id, generator=self.generator,
                                                      gap=tuple(a.consistency_gap), eps=a.eps)
        out = self.model(z_s, timesteps=loglinear_sigma(t_s, a.eps), class_labels=labels, generator=self.generator)
        h_c = _teacher_forward(model, z_c, t_c, a.eps, None, {"class_labels": labels})
        logits = out.logits
        cons = hidden_consistency(out.last_hidden_state, h_c, student)
        ce_sum, count = masked_ce(logits, tokens, student, mask_id)
        task = ce_sum / max(count, 1)
        return task + lam * cons, {"lambda": lam, "task": task.item(), "consistency": cons.item()}

    sample_during_eval = False  # unconditional text samples do not apply

    def validation_sums(self, model, batch, generator) -> torch.Tensor:
        """Masked CE (summed, count) on validation grids: MaskGIT masks from the shared fixed-seed generator
        (every evaluation sees the same masks) and the true labels. Logged as val_nelbo / val_ppl (= exp CE)
        so the shared loop, its printing and `--stop-ppl-rise` apply unchanged."""
        tokens, labels = unpack(batch)
        masked, ratio = maskgit_masks(tokens, generator=generator)
        z = torch.where(masked, torch.full_like(tokens, model.config.mask_token_id), tokens)
        out = model(z, timesteps=loglinear_sigma(ratio), class_labels=labels)
        ce_sum, count = masked_ce(out.logits, tokens, masked, model.config.mask_token_id)
        return torch.tensor([float(ce_sum), float(count)], dtype=torch.float64, device=batch.device)

    def evaluate(self) -> dict:
        result = super().evaluate()
        return {**result, "val_ce": result["val_nelbo"]}


# ------------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None, *, log_with=()) -> str:
    """Train an image model; returns the exported folder. Accepts (and ignores) `--modality image`. `log_with`:
    more Accelerate trackers beside `--report-to`'s and the JSONL log."""
    argv = _strip_modality(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_path, val_path = resolve_data(args.data, args.val_data)
    vq_dir = args.vq or (str(default_vq(args.data)) if default_vq(args.data) else None)
    codebook_size, grid = None, None
    if vq_dir:
        from ..configuration_vqvae import VQVAEConfig

        vq_cfg = VQVAEConfig.from_pretrained(vq_dir)
        codebook_size, grid = vq_cfg.codebook_size, tuple(vq_cfg.grid_size)
    tokens, labels, info = load_token_grids(train_path, grid, codebook_size, args.num_classes)
    num_classes = args.num_classes or int(labels.max()) + 1
    if val_path is not None:
        v_tokens, v_labels, _ = load_token_grids(val_path, info["grid_size"], info["codebook_size"], num_classes)
        train_rows, val_rows = pack(tokens, labels), pack(v_tokens, v_labels)
    else:
        rows = pack(tokens, labels)
        n_val = min(max(1, math.ceil(args.val_fraction * len(rows))), len(rows) - 1)
        train_rows, val_rows = rows[:-n_val], rows[-n_val:]
    accelerator = make_accelerator(args, log_with)
    with output_lock(args.out, accelerator):  # one run per --out (see fpmgm_hf.training.runlock)
        return _train_images(args, accelerator, info, vq_dir, train_rows, val_rows, num_classes)


def _train_images(args, accelerator, info: dict, vq_dir, train_rows, val_rows, num_classes: int) -> str:
    resume = start_run(args, accelerator)
    model = build_image_model(args, info["codebook_size"], info["grid_size"], num_classes)
    # Fields the shared Trainer reads but images do not use.
    args.seq_len = info["grid_size"][0] * info["grid_size"][1]
    args.sample_steps = 8
    assets = ImageAssets(vq_dir, {"modality": "image", "codebook_size": info["codebook_size"],
                                  "grid_size": list(info["grid_size"]), "num_classes": num_classes,
                                  "data": str(args.data)})
    if args.lora_r:
        from ..training.lora import add_lora

        trainer_model = add_lora(model, args.lora_r, args.lora_alpha)
    else:
        trainer_model = model
    trainer = ImageTrainer(args, accelerator, trainer_model, assets, train_rows, val_rows)
    trainer.num_classes = num_classes
    trainer.meta["label_dropout"] = args.label_dropout
    begin(trainer, resume)
    run_loop(trainer)
    return export(trainer, kind="image", card_fields={"has_vq": bool(vq_dir)})


def load_image_model(path: str):
    """(model, VQ tokenizer or None) from an exported folder."""
    from .. import FPMGMForMaskedGeneration
    from .vq import VQVAEModel

    model = FPMGMForMaskedGeneration.from_pretrained(path).eval()
    vq = VQVAEModel.from_pretrained(path, subfolder=VQ_SUBFOLDER).eval() \
        if os.path.isdir(os.path.join(path, VQ_SUBFOLDER)) else None
    return model, vq


if __name__ == "__main__":
    main()
