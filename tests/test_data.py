"""The one data path (`fpmgm_hf.data.pipeline`): what a document is, packing and wrapping, the `datasets` cache,
streaming, and the same blocks in fpmgm-train and the converter."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from fpmgm_hf.data import (
    load_blocks,
    load_documents,
    pack_blocks,
    pack_tokens,
    tokenize_documents,
    train_char_tokenizer,
)

PARAGRAPHS = ["the cat sat on the mat.\nit was a good day.", "a dog ran far away", "\nthree newlines before me",
              "so it goes, and so on; the end of the story"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    text = "\n\n".join(PARAGRAPHS * 6) + "\n\n   \n\n"  # the whitespace-only paragraph is no document
    (root / "a.txt").write_text(text)
    (root / "b.txt").write_text("\n\n".join(reversed(PARAGRAPHS)) + "\n")
    records = [{"id": i, "body": p, "text": "ignored"} for i, p in enumerate(PARAGRAPHS * 6)]
    (root / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tok = train_char_tokenizer([text], str(root / "tok"))
    return types.SimpleNamespace(root=root, txt=str(root / "a.txt"), txt2=str(root / "b.txt"),
                                 jsonl=str(root / "a.jsonl"), tok=tok, cache=str(root / "cache"))


def stream(tok, texts):
    """The reference rule: every document's ids then EOS, concatenated."""
    out = []
    for t in texts:
        out += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(out)


# ------------------------------------------------------------------------------------------ documents


def test_a_txt_document_is_a_blank_line_separated_paragraph(corpus):
    docs = load_documents(corpus.txt, cache_dir=corpus.cache)
    assert docs.column_names == ["text"]
    assert list(docs["text"]) == PARAGRAPHS * 6  # inner newlines kept, the blank paragraph dropped


def test_json_documents_come_from_text_field(corpus):
    docs = load_documents(corpus.jsonl, "body", cache_dir=corpus.cache)
    assert list(docs["text"]) == PARAGRAPHS * 6
    with pytest.raises(ValueError, match=r"--text-field 'missing'.*\['id', 'body', 'text'\]"):
        load_documents(corpus.jsonl, "missing", cache_dir=corpus.cache)


def test_clear_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"--data: file\(s\) not found.*shakespeare"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="--data mixes text and JSON"):
        load_documents(f"{corpus.txt},{corpus.jsonl}")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        load_documents(str(blank), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="empty: fewer tokens than one block of --seq-len 4096"):
        load_blocks(corpus.txt, corpus.tok, 4096, cache_dir=corpus.cache)
    with pytest.raises(ValueError, match="--wrap must be one of"):
        load_blocks(corpus.txt, corpus.tok, 16, wrap="mdlm", cache_dir=corpus.cache)
    with pytest.raises(ValueError, match="--num-proc must be >= 1"):
        load_blocks(corpus.txt, corpus.tok, 16, num_proc=0, cache_dir=corpus.cache)
    no_bos = types.SimpleNamespace(bos_token_id=None, eos_token_id=1)
    with pytest.raises(ValueError, match="--wrap bos_eos needs a tokenizer with BOS and EOS"):
        pack_tokens(None, no_bos, 16, wrap="bos_eos")


def test_unknown_hub_name_is_a_value_error_offline(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="--data 'no-such/dataset-xyz': not a bundled corpus"):
        load_documents("no-such/dataset-xyz")


# --------------------------------------------------------------------------------------------- blocks


def test_packing_rule_cuts_the_document_stream(corpus):
    tok, seq_len = corpus.tok, 16
    ids = stream(tok, PARAGRAPHS * 6)
    n = len(ids) // seq_len  # the incomplete tail is dropped
    blocks = load_blocks(corpus.txt, tok, seq_len, cache_dir=corpus.cache)
    assert blocks.dtype == torch.long and torch.equal(blocks, ids[: n * seq_len].view(n, seq_len))
    assert torch.equal(pack_blocks(PARAGRAPHS * 6, tok, seq_len), blocks)  # the in-memory entry: the same rule


def test_bos_eos_wrapping_frames_every_block(corpus):
    tok, seq_len = corpus.tok, 16
    blocks = load_blocks(corpus.txt, tok, seq_len, wrap="bos_eos", cache_dir=corpus.cache)
    assert blocks.shape[1] == seq_len
    assert (blocks[:, 0] == tok.bos_token_id).all() and (blocks[:, -1] == tok.eos_token_id).all()
    body = stream(tok, PARAGRAPHS * 6)
    n = len(body) // (seq_len - 2)
    assert torch.equal(blocks[:, 1:-1], body[: n * (seq_len - 2)].view(n, seq_len - 2))


@pytest.mark.parametrize("wrap", ["none", "bos_eos"])
def test_streaming_gives_the_same_blocks(corpus, wrap):
    for spec, field in ((f"{corpus.txt},{corpus.txt2}", "text"), (corpus.jsonl, "body")):
        kw = dict(text_field=field, wrap=wrap, cache_dir=corpus.cache)
        eager = load_blocks(spec, corpus.tok, 12, **kw)
        assert torch.equal(load_blocks(spec, corpus.tok, 12, streaming=True, **kw), eager)
        assert torch.equal(load_blocks(spec, corpus.tok, 12, streaming=True, max_blocks=3, **kw), eager[:3])


def test_blocks_do_not_depend_on_num_proc(corpus, tmp_path):
    one = load_blocks(corpus.txt, corpus.tok, 16, cache_dir=str(tmp_path / "one"))
    two = load_blocks(corpus.txt, corpus.tok, 16, num_proc=2, cache_dir=str(tmp_path / "two"))  # fresh: no reuse
    assert torch.equal(two, one)


def test_second_call_reads_the_cache(corpus, tmp_path):
    cache = str(tmp_path / "cache")

    def tokenized():
        return tokenize_documents(load_documents(corpus.txt, cache_dir=cache), corpus.tok)

    first = tokenized()
    files = [f["filename"] for f in first.cache_files]
    assert files and all(f.startswith(cache) for f in files)
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    arrows = sorted(p for p in os.listdir(os.path.dirname(files[0])) if p.endswith(".arrow"))
    second = tokenized()
    assert [f["filename"] for f in second.cache_files] == files  # the same file, not re-tokenised
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps
    assert sorted(p for p in os.listdir(os.path.dirname(files[0])) if p.endswith(".arrow")) == arrows
    assert list(second["input_ids"]) == list(first["input_ids"])


# ---------------------------------------------------------------------------- train and convert agree


class _NoAccelerator:
    main_process_first = staticmethod(contextlib.nullcontext)


def test_train_and_converter_read_the_same_blocks(corpus):
    from fpmgm_hf.conversion import convert
    from fpmgm_hf.training import train

    def train_blocks(*extra):
        args = train.build_parser().parse_args(["--data", corpus.txt, "--out", "unused", "--seq-len", "16",
                                                "--data-cache-dir", corpus.cache, *extra])
        tr, val = train.prepare_data(args, corpus.tok, _NoAccelerator())
        return torch.cat([tr, val])

    def converter_blocks(*extra):
        args = convert.build_parser().parse_args(["--mdlm", "unused", "--output", "unused", "--data", corpus.txt,
                                                  "--data-cache-dir", corpus.cache, *extra])
        return convert.data_blocks(args, corpus.tok, 16, convert.block_wrap(args, corpus.tok, 16))

    assert torch.equal(train_blocks(), converter_blocks("--wrap", "none"))
    # Without a teacher record the converter frames blocks as MDLM's OWT recipe (the tokenizer has BOS and EOS).
    assert torch.equal(train_blocks("--wrap", "bos_eos"), converter_blocks())
    assert torch.equal(train_blocks("--num-proc", "1", "--streaming"), train_blocks())


def _train_record(corpus, tmp_path, wrap="none", val_fraction=0.05):
    """The training-data record fpmgm-train would write for these blocks, saved as a teacher folder's."""
    from fpmgm_hf.data import TRAINING_DATA_FILE, data_record
    from fpmgm_hf.training import train

    args = train.build_parser().parse_args(["--data", corpus.txt, "--out", "unused", "--seq-len", "16",
                                            "--data-cache-dir", corpus.cache, "--wrap", wrap,
                                            "--val-fraction", str(val_fraction)])
    tr, val = train.prepare_data(args, corpus.tok, _NoAccelerator())
    record = data_record(corpus.txt, wrap=wrap, seq_len=16, val_fraction=val_fraction, train=tr, val=val)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / TRAINING_DATA_FILE).write_text(json.dumps(record))
    assert record["data"] == "a.txt" and str(tmp_path) not in json.dumps(record)  # no machine paths
    return teacher, tr, val


def _converter(corpus, teacher, *extra):
    from fpmgm_hf.conversion import convert

    args = convert.build_parser().parse_args(["--mdlm", str(teacher), "--output", "unused", "--data", corpus.txt,
                                              "--data-cache-dir", corpus.cache, "--seq-len", "16", *extra])
    return convert, args


def test_converter_frames_blocks_as_its_teacher_was_trained(corpus, tmp_path):
    teacher, _, _ = _train_record(corpus, tmp_path, wrap="none")
    convert, args = _converter(corpus, teacher)
    record = convert.teacher_record(args)
    assert convert.block_wrap(args, corpus.tok, 16, record) == "none"  # not the tokenizer's bos_eos guess
    convert, args = _converter(corpus, teacher, "--wrap", "bos_eos")
    with pytest.raises(ValueError, match="differs from the teacher's framing 'none'.*--allow-framing-mismatch"):
        convert.block_wrap(args, corpus.tok, 16, record)
    convert, args = _converter(corpus, teacher, "--wrap", "bos_eos", "--allow-framing-mismatch")
    assert convert.block_wrap(args, corpus.tok, 16, record) == "bos_eos"


def test_converter_holds_out_exactly_the_teachers_blocks(corpus, tmp_path):
    teacher, tr, val = _train_record(corpus, tmp_path, val_fraction=0.2)
    convert, args = _converter(corpus, teacher, "--val-blocks", "2", "--verify-batch", "2")
    record = convert.teacher_record(args)
    train_blocks, heldout, info = convert.split_data(args, corpus.tok, 16, _NoAccelerator(), record)
    assert torch.equal(heldout, val) and info["matches_teacher"]  # the teacher's 0.2, read from its record
    assert torch.equal(train_blocks, tr)  # it trains on the teacher's training blocks, never on its held-out ones
    assert torch.equal(convert.verification_batch(args, corpus.tok, 16, heldout), val[:2])
    convert, args = _converter(corpus, teacher, "--val-fraction", "0.05")
    with pytest.raises(ValueError, match="not the teacher's.*--val-fraction \\(0.2\\)"):
        convert.split_data(args, corpus.tok, 16, _NoAccelerator(), convert.teacher_record(args))


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "is empty"),
    ("binary.txt", b"\x00\x01\x02 some bytes", "NUL bytes"),
    ("utf16.txt", "to be or not to be".encode("utf-16"), "UTF-16"),
    ("latin1.txt", "caf\xe9 au lait\n\nna\xefve".encode("latin-1"), "not UTF-8"),
    ("cut.txt", "all is well, ".encode() + "é".encode()[:1], "ends inside a UTF-8 character"),
    ("cut.jsonl", b'{"text": "one"}\n{"text": "tw', "line 2: not a JSON record"),
    ("list.json", b'["a", "b"]', "record 0 is a str"),
    ("scalar.jsonl", b'{"text": "one"}\n42\n', "line 2: a int"),
])
def test_bad_data_files_are_refused_by_name(tmp_path, name, content, message):
    from fpmgm_hf.data import load_documents

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"--data .*{name}.*{message}"):
        load_documents(str(path), cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------- one huge line (issue 26)


def test_a_long_document_is_tokenised_in_pieces_that_tokenise_as_the_whole(tmp_path):
    import random

    from transformers import AutoTokenizer

    from fpmgm_hf.data import train_bpe_tokenizer
    from fpmgm_hf.data.pipeline import PIECE_CHARS, _pieces, _tokenize, separator_id

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far", "away", "king's", "lord,"]
    text = " ".join(rng.choice(words) for _ in range(60_000)) + " " + "x" * (PIECE_CHARS + 5)  # no space to cut at
    pieces = _pieces(text)
    assert "".join(pieces) == text and len(pieces) > 5 and max(map(len, pieces)) <= PIECE_CHARS
    train_bpe_tokenizer([text[:50_000]], 300, str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    whole = tok(text[:-PIECE_CHARS - 5], add_special_tokens=False)["input_ids"]
    got = _tokenize({"text": [text[:-PIECE_CHARS - 5]]}, tok, separator_id(tok))["input_ids"][0]
    assert got == whole + [separator_id(tok)]


def test_one_huge_line_is_tokenised_in_bounded_memory(tmp_path):
    """A 4 MB single-line document: the tokenizer's own working memory stays bounded (one call on the whole line
    added about 650 MB here; 50 MB took 9.4 GB)."""
    code = f"""
import random, resource
from transformers import AutoTokenizer
from fpmgm_hf.data import train_bpe_tokenizer
from fpmgm_hf.data.pipeline import _tokenize, separator_id
rng = random.Random(0)
text = " ".join(rng.choice(["the", "cat", "sat", "on", "mat", "dog", "ran"]) for _ in range(1_000_000))
train_bpe_tokenizer([text[:50_000]], 300, {str(tmp_path / "tok")!r})
tok = AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = _tokenize({{"text": [text]}}, tok, separator_id(tok))["input_ids"][0]
print(len(ids), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    tokens, added_mb = map(int, out.stdout.split()[-2:])
    assert tokens > 1_000_000
    assert added_mb < 300, f"tokenising one 4 MB line added {added_mb} MB"
