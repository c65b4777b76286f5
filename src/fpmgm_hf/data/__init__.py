"""Text data for training: documents from local files, a Hub dataset or a bundled corpus, tokenised and packed
into fixed-length blocks through `datasets` (`fpmgm_hf.data.pipeline`, the rules in docs/data.md), split
train / validation, and iterated over in a seeded, resumable order.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Optional

import torch

from .pipeline import (  # noqa: F401  (the data path's public names live here too)
    BUNDLED_CORPORA,
    DATA_HELP,
    WRAPS,
    add_data_arguments,
    blocks_tensor,
    is_hub_dataset,
    load_blocks,
    load_documents,
    load_texts,
    pack_blocks,
    pack_tokens,
    separator_id,
    tokenize_documents,
)

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------- tokenizer


def load_training_tokenizer(name_or_path: Optional[str] = None, trust_remote_code: bool = False):
    """A fast tokenizer with a mask token: a local folder (from `save_pretrained`), else a name resolved by
    `fpmgm_hf.data.assets.load_tokenizer` (default "gpt2" with [MASK] appended, offline fallback). A folder whose
    tokenizer is its own Python code (`auto_map`) is refused unless `trust_remote_code=True`
    (`--trust-remote-code`), which runs that code."""
    if name_or_path and (os.sep in name_or_path or name_or_path.startswith(".")) and not os.path.isdir(name_or_path):
        raise ValueError(f"--tokenizer: folder {name_or_path!r} does not exist.")
    if name_or_path and os.path.isdir(name_or_path):
        tokenizer = auto_tokenizer(name_or_path, trust_remote_code)
        if tokenizer.mask_token_id is None:
            tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    else:
        from .assets import load_tokenizer  # deferred: the asset helpers are optional at import time

        tokenizer = load_tokenizer(name_or_path or "gpt2")
    if tokenizer.mask_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no mask token and none could be added.")
    return tokenizer


def auto_tokenizer(folder: str, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained(folder)` that runs no code from the folder unless `trust_remote_code`; a
    folder that needs its own code is refused with a ValueError naming it and the flag."""
    from transformers import AutoTokenizer

    from ..validation_fpmgm import check_tokenizer_files

    check_tokenizer_files(folder)  # an edited tokenizer.json is refused like an edited config.json
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise ValueError(f"tokenizer folder {folder!r} wants to run its own Python code (an auto_map entry in its "
                         "tokenizer_config.json); refused. If you trust that code, pass --trust-remote-code "
                         "(trust_remote_code=True).") from err


# ------------------------------------------------------------------------------------------------- blocks


def split_blocks(blocks: Tensor, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """The last `val_fraction` of the blocks (at least one) is validation; needs at least two blocks."""
    if blocks.shape[0] < 2:
        raise ValueError(f"need at least 2 blocks for a train/validation split, got {blocks.shape[0]}.")
    n_val = min(max(1, math.ceil(val_fraction * blocks.shape[0])), blocks.shape[0] - 1)
    return blocks[:-n_val], blocks[-n_val:]


def fingerprint(blocks: Tensor) -> str:
    """A short content hash of the blocks, stored in checkpoints to detect a changed dataset on resume."""
    return hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:16]


TRAINING_DATA_FILE = "training_data.json"  # written next to the weights by fpmgm-train


def data_name(spec: str) -> str:
    """`--data` as recorded: bundled and Hub names as given, local files by their file names (no machine paths)."""
    parts = [p.strip() for p in str(spec).split(",")]
    return ",".join(os.path.basename(p) if os.path.exists(p) else p for p in parts)


def data_record(data: str, *, wrap: str, seq_len: int, val_fraction: float, train: Tensor, val: Tensor,
                text_field: str = "text") -> dict:
    """How a model's training blocks were made and which blocks were held out: enough for a later tool (the MDLM
    converter, an evaluation) to frame its blocks the same way and to check it holds out the same ones."""
    return {"data": data_name(data), "text_field": text_field, "wrap": wrap, "seq_len": int(seq_len),
            "val_fraction": float(val_fraction), "train_blocks": int(train.shape[0]),
            "heldout_blocks": int(val.shape[0]), "train_fingerprint": fingerprint(train),
            "heldout_fingerprint": fingerprint(val)}


def read_data_record(folder) -> Optional[dict]:
    """The `training_data.json` of a model folder, or None (no folder, no record)."""
    import json

    path = os.path.join(str(folder), TRAINING_DATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if not isinstance(record, dict) or not {"data", "wrap", "seq_len", "val_fraction"} <= set(record):
        raise ValueError(f"{path}: not a training-data record (needs data, wrap, seq_len and val_fraction).")
    return record


# ------------------------------------------------------------------------------------------------ batches


class BlockSampler:
    """Deterministic batches over `num_blocks` blocks: epoch e uses permutation `randperm(seed + e)`,
    cut into global batches of `global_batch` blocks (the tail of each epoch is dropped); process `rank`
    takes its `per_process` slice. Batch k depends only on (seed, k), so resuming is a matter of k."""

    def __init__(self, num_blocks: int, global_batch: int, rank: int, per_process: int, seed: int):
        if num_blocks < global_batch:
            raise ValueError(
                f"only {num_blocks} training blocks, fewer than one global batch of {global_batch} "
                "(batch size x processes); use more data, a shorter --seq-len or a smaller --batch-size."
            )
        self.num_blocks, self.global_batch, self.seed = num_blocks, global_batch, seed
        self.rank, self.per_process = rank, per_process
        self.batches_per_epoch = num_blocks // global_batch
        self._epoch, self._perm = None, None

    def indices(self, k: int) -> Tensor:
        epoch, j = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_blocks, generator=g)
        start = j * self.global_batch + self.rank * self.per_process
        return self._perm[start:start + self.per_process]

    def epoch_of(self, k: int) -> int:
        return k // self.batches_per_epoch


def train_bpe_tokenizer(texts: list[str], vocab_size: int, out_dir: str):
    """Train a byte-level BPE on `texts` with `<|endoftext|>` (bos/eos/pad) and `[MASK]`, save it to `out_dir`
    (written to a temp folder, then renamed) and return it. For CPU-scale runs where GPT-2's 50k-token
    output layer would dominate the compute."""

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 for a byte-level BPE (256 bytes + specials), got {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.add_special_tokens({"mask_token": "[MASK]"})
    _save_tokenizer(fast, out_dir)
    return fast


def _save_tokenizer(fast, out_dir: str) -> None:
    """`fast.save_pretrained` into a temporary sibling folder, then renamed over `out_dir`: never half-written."""
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=parent)
    fast.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


CHAR_SPECIALS = ("[UNK]", "<|endoftext|>", "[MASK]")


def train_char_tokenizer(texts: list[str], out_dir: Optional[str] = None):
    """A character-level `PreTrainedTokenizerFast`: every character of `texts` (sorted, so the same corpus always
    gives the same ids) plus `[UNK]`, `<|endoftext|>` (bos/eos/pad) and `[MASK]`. Decoding fuses the characters
    back without spaces. Saved to `out_dir` (temp folder, then renamed) when given, so `AutoTokenizer` loads it
    with no custom code."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)) - set(CHAR_SPECIALS))
    if not chars:
        raise ValueError("train_char_tokenizer: the texts hold no characters.")
    vocab = {c: i for i, c in enumerate(chars)}
    for special in CHAR_SPECIALS:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>", mask_token="[MASK]")
    if out_dir is not None:
        _save_tokenizer(fast, out_dir)
    return fast
