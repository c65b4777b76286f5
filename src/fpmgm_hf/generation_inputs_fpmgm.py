"""The set-up of a `generate` call: its settings, the canvas from a prompt or from nothing, classifier-free
guidance labels (`FPMGMGenerationMixin` inherits these).

Hub-portable: imports only torch, transformers, the standard library and sibling files.
"""

from __future__ import annotations

from typing import Optional

import torch

from .canvas_fpmgm import append_masks, check_attention_mask, check_token_ids, pack, padding_side
from .generation_config_fpmgm import MAX_BATCH_SIZE, FPMGMGenerationConfig, merge_generation_config

Tensor = torch.Tensor


class GenerationInputsMixin:
    """Turns `generate`'s arguments into a settings object and a canvas, with every check naming its argument."""

    def _prepare_generation_config(self, generation_config, kwargs) -> FPMGMGenerationConfig:
        cfg = merge_generation_config(self.generation_config or FPMGMGenerationConfig(), generation_config, kwargs)
        if cfg.mask_token_id is None:
            cfg.mask_token_id = getattr(self.config, "mask_token_id", None)
        if cfg.mask_token_id is None:
            raise ValueError("`mask_token_id` is not set on the model config nor passed to generate().")
        vocab = self.config.vocab_size
        named = [("mask_token_id", cfg.mask_token_id), ("pad_token_id", cfg.pad_token_id)]
        named += [("bos_token_id", cfg.bos_token_id)] + [("eos_token_id", i) for i in cfg.eos_ids]
        for name, value in named:
            if value is not None and value >= vocab:
                raise ValueError(f"`{name}`={value} is outside the vocabulary [0, {vocab}).")
            if value == cfg.mask_token_id and name != "mask_token_id":
                raise ValueError(f"`{name}`={value} equals `mask_token_id`; it must be a real token.")
        if cfg.block_length is not None and cfg.block_length > self.config.max_position_embeddings:
            raise ValueError(
                f"`block_length`={cfg.block_length} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}: a block must fit the model."
            )
        return cfg

    def _prepare_inputs(self, input_ids, attention_mask, class_labels, cfg):
        """Canvas `(B, L)`, active `(B, L)`, class labels `(B,)` or None, and the input's padding side."""
        W, mask_id = self.config.max_position_embeddings, cfg.mask_token_id
        if input_ids is None:
            if attention_mask is not None:
                raise ValueError("`attention_mask` was given without `input_ids`.")
            rows = cfg.batch_size
            ids = torch.full((rows, 0 if cfg.bos_token_id is None else 1), cfg.bos_token_id or 0, dtype=torch.long)
        else:
            ids = check_token_ids(input_ids, "input_ids", self.config.vocab_size)
            rows = ids.shape[0]
        active = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else (
            check_attention_mask(attention_mask, ids.shape).to(ids.device))
        new = self._new_tokens(ids, cfg, from_scratch=input_ids is None)
        side = "none"
        if new is not None:
            side = padding_side(active)
            if side == "right":  # decode left-padded, so every row's new tokens share columns
                ids, active = pack(ids, active, pads_first=True)
            ids, active = append_masks(ids, active, new, mask_id)
        elif input_ids is None:
            length = cfg.seq_len or W
            ids = torch.full((rows, length), mask_id, dtype=torch.long)
            active = torch.ones_like(ids, dtype=torch.bool)
        self._check_canvas(ids, active, new, cfg)
        labels = self._prepare_guidance(class_labels, cfg, rows)
        n = cfg.num_return_sequences
        if rows * n > MAX_BATCH_SIZE:
            raise ValueError(f"{rows} rows x `num_return_sequences`={n} exceeds the limit of {MAX_BATCH_SIZE} rows.")
        expand = lambda x: None if x is None else x.repeat_interleave(n, 0).to(self.device)  # noqa: E731
        return expand(ids), expand(active), expand(labels), side

    def _new_tokens(self, ids, cfg, from_scratch: bool) -> Optional[int]:
        """Masks to append: `max_new_tokens`, else `max_length` minus the prompt, else None (fill a canvas)."""
        if cfg.max_new_tokens is not None:
            return cfg.max_new_tokens
        if cfg.max_length is None:
            return None
        new = cfg.max_length - ids.shape[1]
        if new < 1:
            raise ValueError(
                f"`max_length`={cfg.max_length} leaves no room after the {ids.shape[1]}-token prompt; pass a larger "
                "`max_length` or `max_new_tokens`."
            )
        return new

    def _check_canvas(self, ids, active, new, cfg):
        W = self.config.max_position_embeddings
        if ids.shape[1] == 0:
            raise ValueError("`input_ids` has zero length: pass tokens, or `max_new_tokens` to generate some.")
        if new is None and ids.shape[1] > W:
            name = "seq_len" if cfg.seq_len is not None and ids.shape[1] == cfg.seq_len else "input_ids"
            raise ValueError(
                f"`{name}` length {ids.shape[1]} exceeds max_position_embeddings={W}; to generate past it, give a "
                "prompt and `max_new_tokens` (decoded blockwise with a sliding context)."
            )
        if ids.shape[1] > W and getattr(self.config, "position_encoding", "rope_1d") == "rope_2d":
            raise ValueError(
                f"`max_new_tokens`={new} makes {ids.shape[1]} tokens, more than this image model's grid of {W}."
            )
        if bool(((ids == cfg.mask_token_id) & ~active).any()):
            raise ValueError("`attention_mask` is 0 at a masked position of `input_ids`: padding is never filled.")

    def _prepare_guidance(self, class_labels, cfg, batch):
        num_classes = getattr(self.config, "num_classes", 0)
        if cfg.guidance_scale is not None and not num_classes:
            raise ValueError(
                "`guidance_scale` needs a class-conditional model (config.num_classes > 0); this one is unconditional."
            )
        if cfg.guidance_scale is not None and class_labels is None:
            raise ValueError(
                f"`guidance_scale`={cfg.guidance_scale} needs `class_labels` (guidance pulls towards a class); pass "
                "them, or guidance_scale=None for unconditional samples."
            )
        if class_labels is None:
            return None
        if not num_classes:
            raise ValueError("`class_labels` was given but the model is unconditional (config.num_classes=0).")
        try:
            labels = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"`class_labels` must be integer class ids: {err}") from None
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"`class_labels` must be integer class ids; got dtype {labels.dtype}.")
        labels = labels.long().reshape(-1)
        if labels.numel() == 1 and batch > 1:
            labels = labels.expand(batch)
        if labels.shape[0] != batch or int(labels.min()) < 0 or int(labels.max()) > num_classes:
            raise ValueError(f"`class_labels` must be {batch} ids in [0, {num_classes}] ({num_classes} = null class).")
        return labels
