"""Model-free canvas handling for `generate`: input checks, prompts + new masks, padding sides, blocks and
sliding windows, and the EOS rule.

Hub-portable: imports only torch and the standard library. A canvas is a `LongTensor (B, L)` of token ids in
which `mask_token_id` marks the positions to generate; `active (B, L)` is False on padding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


def check_token_ids(ids, name: str, vocab_size: int) -> Tensor:
    """`ids` as a `LongTensor (B, L)` with every value in [0, vocab_size); integer tensors of any width,
    nested lists and numpy arrays are accepted. Raises `ValueError` naming `name` otherwise."""
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`{name}` must be an integer tensor of shape (batch, length): {err}") from None
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"`{name}` must hold integer token ids; got dtype {ids.dtype}.")
    if ids.dim() != 2:
        raise ValueError(f"`{name}` must have shape (batch, length), got {tuple(ids.shape)}.")
    if ids.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {tuple(ids.shape)}); pass at least one row.")
    wide = ids.long()  # before the range check: min/max are not implemented for uint16/32/64
    if ids.dtype == torch.uint64 and bool((wide < 0).any()):  # values >= 2**63 wrapped around
        raise ValueError(f"`{name}` holds ids >= 2**63; valid ids lie in [0, {vocab_size}).")
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= vocab_size):
        raise ValueError(
            f"`{name}` must lie in [0, {vocab_size}) (the vocabulary); got values in "
            f"[{int(wide.min())}, {int(wide.max())}]."
        )
    return wide


def check_attention_mask(mask, shape) -> Tensor:
    """`mask` as a `BoolTensor` of `shape`: values must be 0/1 (any numeric dtype) or booleans."""
    try:
        mask = torch.as_tensor(mask)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`attention_mask` must be a tensor of 0/1 values: {err}") from None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"`attention_mask` shape {tuple(mask.shape)} must equal `input_ids` shape {tuple(shape)}.")
    if mask.is_complex() or (mask.numel() and not bool(((mask == 0) | (mask == 1)).all())):
        raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (token) values.")
    return mask.bool()


def padding_side(active: Tensor) -> str:
    """"left" (zeros first), "right" (zeros last) or "none"; any other layout raises `ValueError`."""
    if bool(active.all()):
        return "none"
    order = active.long()
    if bool((order[:, 1:] >= order[:, :-1]).all()):
        return "left"
    if bool((order[:, 1:] <= order[:, :-1]).all()):
        return "right"
    raise ValueError(
        "`attention_mask` must be left- or right-padded (zeros only at the start or only at the end of each row) "
        "when `max_new_tokens` appends tokens."
    )


def pack(ids: Tensor, active: Tensor, pads_first: bool) -> tuple[Tensor, Tensor]:
    """Move each row's padding to the start (`pads_first`) or the end, keeping the order of the tokens."""
    key = active.long() if pads_first else (~active).long()
    perm = torch.sort(key, dim=1, stable=True).indices  # (B, L)
    return ids.gather(1, perm), active.gather(1, perm)


def append_masks(ids: Tensor, active: Tensor, n: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """Prompt (B, P) -> (B, P + n) with n active masks after it (callers left-pad first)."""
    masks = torch.full((ids.shape[0], n), mask_id, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, masks], 1), torch.cat([active, torch.ones_like(masks, dtype=torch.bool)], 1)


def first_masked_column(canvas: Tensor, active: Tensor, mask_id: int) -> int:
    """The first column holding a masked, active token in any row (L when there is none): the start of the
    region `generate` decodes, and the end of the prompt a streamer receives first."""
    cols = ((canvas == mask_id) & active).any(0).nonzero()
    return int(cols[0]) if cols.numel() else canvas.shape[1]


def plan_blocks(start: int, total: int, block_length: Optional[int], window: int) -> list[tuple[int, int, int, int]]:
    """Blocks `[s, e)` covering `[start, total)` left to right, each with its window `[ws, we)`.

    The window is at most `window` (max_position_embeddings) tokens that hold the whole block: when the
    sequence fits it is the whole sequence (LLaDA: later blocks stay visible as masks); otherwise it ends
    with the block and reaches back over the most recent tokens (a sliding context).
    """
    if start >= total:
        return []
    if block_length is None:
        block_length = total - start if total <= window else max(1, window // 2)
    blocks = []
    for s in range(start, total, block_length):
        e = min(s + block_length, total)
        ws = 0 if total <= window else max(0, e - window)
        blocks.append((s, e, ws, min(total, ws + window)))
    return blocks


def _is_eos(canvas: Tensor, generated: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """(B, L) True at generated EOS tokens (an EOS in the prompt does not end a row)."""
    return torch.isin(canvas, torch.tensor(list(eos_ids), dtype=canvas.dtype, device=canvas.device)) & generated


def eos_reached(canvas: Tensor, generated: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """(B,) True for rows that generated an EOS."""
    return _is_eos(canvas, generated, eos_ids).any(1)


def apply_eos(canvas: Tensor, generated: Tensor, eos_ids: Sequence[int], pad_id: int) -> Tensor:
    """The EOS rule: in every row, each generated position after the first generated EOS becomes `pad_id`
    (still-masked positions too, so later blocks skip finished rows). Fixed (prompt) tokens never change."""
    eos = _is_eos(canvas, generated, eos_ids)
    after = (eos.long().cumsum(1) - eos.long()) > 0  # strictly after the first EOS
    return torch.where(after & generated, torch.full_like(canvas, pad_id), canvas)
