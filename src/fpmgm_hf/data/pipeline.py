"""The one text-data path of fpmgm_hf: documents -> tokens -> fixed-length blocks, through `datasets`.

`fpmgm-train`, the converter (`fpmgm-convert`), the reference LM (`fpmgm-eval train-lm`) and the stability check
all call `load_blocks`, so the same `--data` gives the same documents and, with the same `wrap`, the same blocks.
The rules (docs/data.md):

- A document of a `.txt` (any file not ending in `.json` / `.jsonl`) is a paragraph: the file is split on blank
  lines ("\\n\\n", `datasets`' text builder with `sample_by="paragraph"`), text kept as is; a `.json` / `.jsonl`
  record or a Hub record is one document (its `text_field`); a bundled corpus ("shakespeare", "kjv") is cut into
  documents of 32 non-empty lines (its lines and verses are too short to stand alone). Empty and whitespace-only
  documents are dropped.
- Tokenisation is a batched `map` (`num_proc` processes) that appends EOS (SEP when there is no EOS) to each
  document. File-backed datasets (local files, bundled corpora, downloaded Hub sets) cache the result under the
  `datasets` cache (or `cache_dir`): a second call with the same data and tokenizer reads it back.
- Packing concatenates the documents' tokens in order and cuts the stream into consecutive blocks of `seq_len`
  tokens (`wrap="none"`), or of `seq_len - 2` tokens framed as `[BOS] + chunk + [EOS]` (`wrap="bos_eos"`, MDLM's
  wrapped blocks). Blocks cross document boundaries; only the final incomplete block of the whole stream is
  dropped. The packing map carries the unfinished block from one batch to the next, so the blocks do not depend
  on the batch size, on `num_proc` or on streaming.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from typing import Optional

import numpy as np
import torch

Tensor = torch.Tensor
BUNDLED_CORPORA = ("shakespeare", "kjv")
JSON_SUFFIXES = (".json", ".jsonl")
TEXT_SUFFIXES = (".txt", ".text", ".md")
WRAPS = ("none", "bos_eos")
LINES_PER_BUNDLED_DOCUMENT = 32
MAP_BATCH = 1000  # documents per map batch: bounds memory per batch, changes no result
_RULE_VERSION = "fpmgm-data-2"  # part of the cache fingerprints: bump when the rules above change

DATA_HELP = ("'shakespeare' or 'kjv' (bundled), comma-separated local files (.txt: one document per blank-line "
             "separated paragraph; .json/.jsonl: one per record), or a Hub dataset name")


# ------------------------------------------------------------------------------------------- documents


def _files(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def _looks_like_path(spec: str) -> bool:
    # "org/name" is a Hub dataset; a file is named by an existing path, a known suffix or an explicit prefix.
    def local(p: str) -> bool:
        return os.path.isfile(p) or p.endswith(TEXT_SUFFIXES + JSON_SUFFIXES) or p.startswith(("/", ".", "~"))

    return any(local(p) for p in _files(spec))


def is_hub_dataset(spec: str) -> bool:
    """Whether `--data spec` names a Hub dataset (neither a bundled corpus nor local files)."""
    return spec not in BUNDLED_CORPORA and not _looks_like_path(spec)


def _bundled_documents(name: str):
    from .assets import load_text_corpus

    lines = load_text_corpus(name)
    for i in range(0, len(lines), LINES_PER_BUNDLED_DOCUMENT):
        yield {"text": "\n".join(lines[i:i + LINES_PER_BUNDLED_DOCUMENT])}


def _local_kind(paths: list[str]) -> str:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--data: file(s) not found: {missing}. Give {DATA_HELP}.")
    kinds = {"json" if p.endswith(JSON_SUFFIXES) else "text" for p in paths}
    if len(kinds) > 1:
        raise ValueError(f"--data mixes text and JSON (.json/.jsonl) files ({paths}); give one kind at a time.")
    kind = kinds.pop()
    for path in paths:
        check_text_file(path)
        if kind == "json":
            _check_json_records(path)
    return kind


def check_text_file(path: str) -> None:
    """A `--data` file must be non-empty UTF-8 text: an empty, binary, UTF-16 or otherwise mis-encoded file is
    refused naming it and what to do, instead of failing deep inside `datasets`. Reads the file once, in chunks."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"--data {path!r} is empty.")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"--data {path!r} is UTF-16 (it starts with a byte-order mark); re-encode it as UTF-8, "
                         f"e.g. iconv -f UTF-16 -t UTF-8.")
    if b"\x00" in head:
        raise ValueError(f"--data {path!r} is not text: it holds NUL bytes (a binary file?).")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ValueError(f"--data {path!r} is not UTF-8 (byte {offset + err.start}: {err.reason}); "
                                 "re-encode it, e.g. iconv -f latin1 -t UTF-8.") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"--data {path!r} ends inside a UTF-8 character (a truncated file?).") from None


def _check_json_records(path: str) -> None:
    """Every record of a .json (an array) or .jsonl (a line each) file must be a JSON object."""
    import json

    with open(path, encoding="utf-8") as f:
        first = f.read(4096).lstrip()[:1]
    if first == "[":
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"--data {path!r}: not valid JSON ({err}).") from None
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(f"--data {path!r}: record {bad} is a {type(records[bad]).__name__}, not an object "
                             "with a text field.")
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--data {path!r}, line {number}: not a JSON record ({err.msg}; a truncated "
                                 "file?).") from None
            if not isinstance(record, dict):
                raise ValueError(f"--data {path!r}, line {number}: a {type(record).__name__}, not an object with a "
                                 "text field.")


def _raw_documents(spec: str, *, split: str, config: Optional[str], streaming: bool, cache_dir: Optional[str]):
    import datasets

    if spec in BUNDLED_CORPORA:
        cls = datasets.IterableDataset if streaming else datasets.Dataset
        extra = {} if streaming else {"cache_dir": cache_dir}
        return cls.from_generator(_bundled_documents, gen_kwargs={"name": spec}, **extra)
    if _looks_like_path(spec):
        paths = _files(spec)
        kind = _local_kind(paths)
        options = {"sample_by": "paragraph"} if kind == "text" else {}
        return datasets.load_dataset(kind, data_files=paths, split="train", streaming=streaming, cache_dir=cache_dir,
                                     **options)
    try:
        return datasets.load_dataset(spec, config, split=split, streaming=streaming, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as err:
        raise ValueError(f"--data {spec!r}: not a bundled corpus ({', '.join(BUNDLED_CORPORA)}), not an existing "
                         f"local file, and not a Hub dataset that can be loaded here ({err}).") from err


def _keep(batch: dict) -> list[bool]:
    return [bool(t and t.strip()) for t in batch["text"]]


def _fingerprint(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, (_RULE_VERSION,) + parts)).encode()).hexdigest()[:16]


def load_documents(spec: str, text_field: str = "text", *, split: str = "train", config: Optional[str] = None,
                   streaming: bool = False, cache_dir: Optional[str] = None):
    """The documents of `--data spec` as a `datasets.Dataset` (an `IterableDataset` with `streaming=True`) with
    the one column "text", empty and whitespace-only documents dropped (module docstring: what a document is).

    `spec`: "shakespeare" / "kjv", comma-separated local files of one kind (.txt-like or .json/.jsonl), or a Hub
    dataset name (its `split`, optional `config`). `text_field`: the column holding the text in JSON and Hub
    records (a .txt is always "text"). Raises ValueError naming `--data` / `--text-field` for a missing file, mixed
    kinds, an unknown name, a missing field or (not streaming) no document at all."""
    ds = _raw_documents(spec, split=split, config=config, streaming=streaming, cache_dir=cache_dir)
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"--text-field {text_field!r}: --data {spec!r} has no such field; its fields are "
                         f"{columns}.")
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    if streaming:
        return ds.filter(_keep, batched=True, batch_size=MAP_BATCH)
    ds = ds.filter(_keep, batched=True, batch_size=MAP_BATCH, new_fingerprint=_fingerprint(ds._fingerprint, "keep"))
    if len(ds) == 0:
        raise ValueError(f"--data {spec!r} holds no text: no document with a non-blank character.")
    return ds


def load_texts(spec: str, text_field: str = "text") -> list[str]:
    """The documents of `spec` (see `load_documents`) as a list of strings, e.g. to train a tokenizer on."""
    return list(load_documents(spec, text_field)["text"])


# -------------------------------------------------------------------------------------------- tokens


def separator_id(tokenizer) -> int:
    """The token appended after every document: EOS, else SEP."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError("the tokenizer has neither an EOS nor a SEP token to separate documents.")
    return eos


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the full vocabulary, merges and added tokens: changes whenever the ids would
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    from datasets.fingerprint import Hasher

    return Hasher.hash(tokenizer)


PIECE_CHARS = 1 << 16  # a longer document is tokenised in pieces: one 50 MB line took 9.4 GB in one call


def _pieces(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most `limit` characters, each cut just before a whitespace character where
    there is one (byte-level BPE attaches a space to the word after it, so such a cut tokenises as the whole)."""
    out, start = [], 0
    while len(text) - start > limit:
        cut = max(text.rfind(" ", start + 1, start + limit), text.rfind("\n", start + 1, start + limit))
        cut = cut if cut > start else start + limit
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _tokenize(batch: dict, tokenizer, sep: int) -> dict:
    pieces = [_pieces(text) for text in batch["text"]]
    flat = [piece for doc in pieces for piece in doc]
    ids = iter(tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"])
    return {"input_ids": [[t for _ in doc for t in next(ids)] + [sep] for doc in pieces]}


def tokenize_documents(docs, tokenizer, *, num_proc: Optional[int] = None):
    """Batched `map` from documents to `input_ids` (each document's tokens followed by `separator_id`), the text
    column removed. On a file-backed `Dataset` the result is cached by a fingerprint of the documents and the
    tokenizer's vocabulary; `num_proc` processes tokenise shards in parallel (ignored when streaming)."""
    import datasets

    if num_proc is not None and num_proc < 1:
        raise ValueError(f"--num-proc must be >= 1, got {num_proc}.")
    sep = separator_id(tokenizer)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    kwargs = dict(batched=True, batch_size=MAP_BATCH, remove_columns=["text"], features=features,
                  fn_kwargs={"tokenizer": tokenizer, "sep": sep})
    if isinstance(docs, datasets.IterableDataset):
        return docs.map(_tokenize, **kwargs)
    fp = _fingerprint(docs._fingerprint, "tokenize", _tokenizer_identity(tokenizer), sep)
    return docs.map(_tokenize, num_proc=num_proc if num_proc and num_proc > 1 else None, new_fingerprint=fp,
                    desc="tokenizing", **kwargs)


# -------------------------------------------------------------------------------------------- blocks


class _Packer:
    """The packing map: consecutive cuts of the concatenated token stream. The unfinished block is carried to the
    next batch (so one process, in order); the carry restarts at index 0, i.e. on every new pass over the data."""

    def __init__(self, body: int, frame: Optional[tuple[int, int]]):
        self.body, self.frame, self.carry = body, frame, np.zeros(0, np.int64)

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        if indices and indices[0] == 0:
            self.carry = np.zeros(0, np.int64)
        stream = np.concatenate([self.carry] + [np.asarray(x, np.int64) for x in batch["input_ids"]])
        n = len(stream) // self.body
        self.carry = stream[n * self.body:]
        blocks = stream[: n * self.body].reshape(n, self.body)
        if self.frame is not None:
            bos, eos = self.frame
            blocks = np.concatenate([np.full((n, 1), bos), blocks, np.full((n, 1), eos)], axis=1)
        return {"input_ids": blocks.astype(np.int32)}


def _frame(tokenizer, wrap: str, seq_len: int) -> Optional[tuple[int, int]]:
    if wrap not in WRAPS:
        raise ValueError(f"--wrap must be one of {WRAPS}, got {wrap!r}.")
    if wrap == "none":
        return None
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None or seq_len < 3:
        raise ValueError("--wrap bos_eos needs a tokenizer with BOS and EOS tokens and --seq-len >= 3.")
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def pack_tokens(tokens, tokenizer, seq_len: int, *, wrap: str = "none"):
    """Batched `map` from tokenised documents to blocks: one column `input_ids` of `seq_len` ids per row
    (module docstring: the packing rule). Cached like `tokenize_documents` on a file-backed `Dataset`."""
    import datasets

    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}.")
    frame = _frame(tokenizer, wrap, seq_len)
    packer = _Packer(seq_len - 2 if frame else seq_len, frame)
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=seq_len)})
    kwargs = dict(with_indices=True, batched=True, batch_size=MAP_BATCH, remove_columns=["input_ids"],
                  features=features)
    if isinstance(tokens, datasets.IterableDataset):
        return tokens.map(packer, **kwargs)
    fp = _fingerprint(tokens._fingerprint, "pack", seq_len, frame)
    return tokens.map(packer, new_fingerprint=fp, desc="packing", **kwargs)


def blocks_tensor(blocks, seq_len: int, max_blocks: Optional[int] = None) -> Tensor:
    """`(N, seq_len)` int64 tensor of the first `max_blocks` (all when None) rows of a packed (Iterable)Dataset."""
    import datasets
    import pyarrow.compute as pc

    if isinstance(blocks, datasets.IterableDataset):
        rows = []
        for row in blocks:
            if max_blocks is not None and len(rows) >= max_blocks:
                break
            rows.append(row["input_ids"])
        flat = np.asarray(rows, np.int64).reshape(-1)
    else:
        blocks = blocks.flatten_indices() if blocks._indices is not None else blocks
        column = blocks.data.column("input_ids")  # read from the Arrow table: no Python lists, no copy to disk
        if max_blocks is not None:
            column = column.slice(0, max_blocks)
        flat = pc.list_flatten(column).to_numpy().astype(np.int64)
    return torch.from_numpy(flat).view(-1, seq_len)


def _check_blocks(blocks: Tensor, seq_len: int, tokenizer) -> Tensor:
    if blocks.shape[0] == 0:
        raise ValueError(f"the dataset is empty: fewer tokens than one block of --seq-len {seq_len}.")
    if int(blocks.max()) >= len(tokenizer):
        raise ValueError(f"token id {int(blocks.max())} is outside the tokenizer's size {len(tokenizer)}.")
    return blocks


def load_blocks(spec: str, tokenizer, seq_len: int, *, text_field: str = "text", wrap: str = "none",
                streaming: bool = False, num_proc: Optional[int] = None, cache_dir: Optional[str] = None,
                max_blocks: Optional[int] = None, split: str = "train", config: Optional[str] = None) -> Tensor:
    """`(N, seq_len)` int64 blocks of `--data spec`: `load_documents` -> `tokenize_documents` -> `pack_tokens` ->
    `blocks_tensor`. Run it inside `accelerator.main_process_first()` so that one process fills the cache and
    the others read it. `max_blocks` stops a stream early. Raises ValueError when no block comes out."""
    docs = load_documents(spec, text_field, split=split, config=config, streaming=streaming, cache_dir=cache_dir)
    packed = pack_tokens(tokenize_documents(docs, tokenizer, num_proc=num_proc), tokenizer, seq_len, wrap=wrap)
    return _check_blocks(blocks_tensor(packed, seq_len, max_blocks), seq_len, tokenizer)


def pack_blocks(texts: list[str], tokenizer, seq_len: int, wrap: str = "none") -> Tensor:
    """`(N, seq_len)` blocks of in-memory `texts` (each one document) by the same rule as `load_blocks` (not
    cached: the documents live in memory)."""
    import datasets

    docs = datasets.Dataset.from_dict({"text": list(texts)}).filter(_keep, batched=True)
    packed = pack_tokens(tokenize_documents(docs, tokenizer), tokenizer, seq_len, wrap=wrap)
    return _check_blocks(blocks_tensor(packed, seq_len), seq_len, tokenizer)


def add_data_arguments(parser, *, streaming_default: Optional[bool] = False) -> None:
    """`--num-proc`, `--streaming` and `--data-cache-dir`, shared by fpmgm-train and fpmgm-convert."""
    import argparse

    a = parser.add_argument
    a("--num-proc", type=int, default=None,
      help="processes that tokenise --data (datasets.map num_proc); the blocks do not depend on it")
    a("--streaming", action=argparse.BooleanOptionalAction, default=streaming_default,
      help="read --data as a stream (datasets streaming: nothing downloaded or cached up front; tokenised on the "
           "fly in one process); the blocks are the same as without it" +
           ("; default: stream Hub datasets, load local files" if streaming_default is None else ""))
    a("--data-cache-dir", default=None,
      help="datasets cache folder for the loaded, tokenised and packed --data (default: the datasets cache)")
