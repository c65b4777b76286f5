"""Tests for fpmgm_hf.data.assets.

Fast tests use synthetic files only. ``test_gpt2_tokenizer_*`` needs one small PyPI download (openai-whisper
sdist, 0.8 MB) into the normal asset cache; the other downloads are ``slow`` (RUN_SLOW=1).
"""

import gzip
import hashlib
import io
import logging
import tarfile
import zipfile

import numpy as np
import pytest

from fpmgm_hf.data import assets

# --------------------------------------------------------------------------------------------- fast tests


def test_unknown_names_raise_listing_valid_names():
    with pytest.raises(ValueError, match="valid names: .*gpt2_tiktoken.*mnist"):
        assets.asset_path("no_such_asset")
    with pytest.raises(ValueError, match="shakespeare, kjv"):
        assets.load_text_corpus("mnist")
    with pytest.raises(ValueError, match="mnist, fashion_mnist"):
        assets.load_image_dataset("kjv", "train")
    with pytest.raises(ValueError, match="valid splits"):
        assets.load_image_dataset("mnist", "valid")  # checked before anything is fetched
    with pytest.raises(ValueError, match="valid names"):
        assets.fetch_all(["gpt2_tiktoken", "bogus"])  # validated up front, nothing fetched


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("FPMGM_ASSETS", str(tmp_path / "custom"))
    assert assets.cache_dir() == tmp_path / "custom"
    assert (tmp_path / "custom").is_dir()
    monkeypatch.delenv("FPMGM_ASSETS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "fpmgm_hf" / "assets"


def test_atomic_write(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with assets.atomic_write(target, "w") as f:
        f.write("héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    # A failure mid-write keeps the old content and leaves no temp file behind.
    with pytest.raises(RuntimeError), assets.atomic_write(target, "w") as f:
        f.write("partial")
        raise RuntimeError("boom")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
    with assets.atomic_write(tmp_path / "b.bin") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_extract_checks_sha256(tmp_path, monkeypatch, kind):
    payload = b"asset bytes" * 1000
    if kind == "zip":
        archive = tmp_path / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("pkg/data/x.bin", payload)
            zf.writestr("pkg/other.py", b"")
    else:
        archive = tmp_path / "pkg-1.0.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            info = tarfile.TarInfo("pkg-1.0/pkg/data/x.bin")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    dest = tmp_path / "out" / "x.bin"
    monkeypatch.setitem(assets._SHA256, "x.bin", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        assets._extract(archive, "*pkg/data/*.bin", dest)
    assert not dest.exists()  # a corrupt member never lands in the cache
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(assets._SHA256, "x.bin", digest)
    assets._extract(archive, "*pkg/data/*.bin", dest)
    assert dest.read_bytes() == payload
    assert dest.with_name("x.bin.sha256").read_text() == f"{digest}  x.bin\n"
    with pytest.raises(RuntimeError, match="exactly one member"):
        assets._extract(archive, "*.nothing", tmp_path / "none.bin")


def test_clean_markdown():
    md = "# Play\n\n## ACT I\n\n_Enter A_\n\n**A**  \nTo be, or not  \nto be.\n\n\n\n"
    assert assets._clean_markdown(md) == "Play\n\nACT I\n\nEnter A\n\nA\nTo be, or not\nto be.\n"


def test_bytes_to_unicode_and_bpe_parts():
    table = assets._bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("!")] == "!" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257, b"bc": 258}
    assert assets._bpe_parts(b"abc", ranks, 257) == [b"ab", b"c"]  # "abc" is made from ab + c
    assert assets._bpe_parts(b"abc", ranks, 10**9) == [b"abc"]


def _write_idx(path, arr, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_missing_and_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("FPMGM_ASSETS", str(tmp_path / "cache"))
    src = tmp_path / "fashion"
    src.mkdir()
    monkeypatch.setenv("FPMGM_FASHION_MNIST_DIR", str(src))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        assets.asset_path("fashion_mnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 3)):
        _write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(src / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    x, y = assets.load_image_dataset("fashion_mnist", "train")
    assert x.shape == (6, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 2, 3, 4, 5]
    assert assets.load_image_dataset("fashion_mnist", "test")[0].shape == (3, 28, 28)


def test_load_tokenizer_no_fallback_for_other_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="offline fallback exists only for 'gpt2'"):
        assets.load_tokenizer("fpmgm-test/definitely-not-a-repo")


# ------------------------------------------------------------- essential download (0.8 MB whisper sdist)


@pytest.fixture(scope="session")
def gpt2_tok():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # never wait on the Hub; exercises the explicit fallback
        return assets.load_tokenizer("gpt2")


def test_gpt2_tokenizer_matches_gpt2(gpt2_tok):
    tok = gpt2_tok
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok("Hello, my dog is cute").input_ids == [15496, 11, 616, 3290, 318, 13779]
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 50256
    assert tok.mask_token == "[MASK]" and tok.mask_token_id == 50257 and len(tok) == 50258
    text = "Thou art  more lovely\nand more temperate — naïve café 🙂 1234"
    assert tok.decode(tok(text).input_ids) == text
    assert assets.sha256_file(assets.asset_path("gpt2_tiktoken")) == assets._SHA256["gpt2.tiktoken"]
    folder = assets.gpt2_tokenizer_dir()
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in folder.iterdir()}


def test_gpt2_fallback_is_logged(gpt2_tok, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="fpmgm_hf.data.assets"):
        tok = assets.load_tokenizer("gpt2", add_mask_token=False)
    assert any("falling back to the PyPI-shipped GPT-2 BPE" in r.getMessage() for r in caplog.records)
    assert tok.mask_token is None and len(tok) == 50257
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="offline fallback disabled"):
        assets.load_tokenizer("gpt2", offline_fallback=False)


# ------------------------------------------------------------------------------- slow: bigger downloads


@pytest.mark.slow
def test_mnist():
    x, y = assets.load_image_dataset("mnist", "train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64 and y[:5].tolist() == [5, 0, 4, 1, 9]
    xt, yt = assets.load_image_dataset("mnist", "test")
    assert xt.shape == (10000, 28, 28) and yt[:5].tolist() == [7, 2, 1, 0, 4]
    assert x.max() == 255 and set(np.unique(y)) == set(range(10))


@pytest.mark.slow
def test_text_corpora():
    lines = assets.load_text_corpus("shakespeare")
    assert sum(map(len, lines)) > 4_000_000 and all(line.strip() for line in lines)
    text = assets.asset_path("shakespeare").read_text(encoding="utf-8")
    assert "**" not in text and "_" not in text and "\n#" not in text
    verses = assets.load_text_corpus("kjv")
    assert len(verses) == 31103
    assert verses[0] == "In the beginning God created the heaven and the earth."


@pytest.mark.slow
def test_smollm2_gguf_and_fid_inception():
    gguf = assets.asset_path("smollm2_gguf")
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 90e6
    with gguf.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert assets.asset_path("fid_inception").stat().st_size > 80e6


@pytest.mark.slow
def test_real_fashion_mnist():
    if not (assets.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("apt-get install -y dataset-fashion-mnist")
    x, y = assets.load_image_dataset("fashion_mnist", "train")
    assert x.shape == (60000, 28, 28) and y[:5].tolist() == [9, 0, 0, 3, 0]
    assert assets.load_image_dataset("fashion_mnist", "test")[0].shape == (10000, 28, 28)
