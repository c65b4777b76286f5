"""All-or-nothing loads and atomic saves of the Hub models (FP-MGM and the VQ tokenizer): every damaged folder is
refused with an error naming the file, tensor or shape; a save killed at any moment leaves the old folder or the
new one; a Hub cache snapshot is verified like a local folder."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from reliability_table import expect_error, record
from safetensors.torch import load_file, save_file
from transformers.utils import logging as transformers_logging

from fpmgm_hf import FPMGMForMaskedGeneration, FPMGMModel, VQVAEConfig, VQVAEModel
from fpmgm_hf.validation_fpmgm import MANIFEST_NAME, CheckpointFolderError, main, verify_folder

AREA = "integrity"


@pytest.fixture
def saved(tmp_path) -> Path:
    tiny_model().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _rewrite_weights(folder: Path, edit) -> None:
    """Replace model.safetensors by `edit(tensors)` and drop the manifest (a consistent but wrong folder)."""
    sd = load_file(folder / "model.safetensors")
    save_file(edit(sd), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / MANIFEST_NAME).unlink()


def _load(folder, cls=FPMGMForMaskedGeneration, **kw):
    return lambda: cls.from_pretrained(folder, **kw)


def test_save_writes_a_manifest_of_every_file(saved):
    files = json.loads((saved / MANIFEST_NAME).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in saved.iterdir() if p.name != MANIFEST_NAME)
    assert verify_folder(str(saved)) == []
    assert main(["verify", str(saved)]) == 0


def test_missing_tensor_is_named(saved):
    _rewrite_weights(saved, lambda sd: {k: v for k, v in sd.items() if k != "lm_head.linear.weight"})
    expect_error(AREA, "weights file missing one tensor", _load(saved), CheckpointFolderError,
                 r"missing tensors \(1; .*lm_head\.linear\.weight")


def test_unexpected_tensor_is_named(saved):
    _rewrite_weights(saved, lambda sd: {**sd, "model.extra.weight": torch.zeros(2)})
    expect_error(AREA, "weights file with an extra tensor", _load(saved), CheckpointFolderError,
                 r"unexpected tensors \(1\): model\.extra\.weight")


def test_empty_weights_file_lists_every_tensor(saved):
    n = len(load_file(saved / "model.safetensors"))
    _rewrite_weights(saved, lambda sd: {})
    expect_error(AREA, "empty weights file (no tensors)", _load(saved), CheckpointFolderError,
                 rf"missing tensors \({n}; ")


def test_config_with_more_layers_than_the_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(config, num_post_layers=2)))
    (saved / MANIFEST_NAME).unlink()
    expect_error(AREA, "config.json with more layers than the weights", _load(saved), CheckpointFolderError,
                 r"missing tensors .*model\.post_blocks\.1\.")


def test_missing_config_is_named(saved):
    (saved / "config.json").unlink()
    expect_error(AREA, "folder without config.json", _load(saved), CheckpointFolderError, r"has no config\.json")
    # an explicit config is the one way to load such a folder
    model = FPMGMForMaskedGeneration.from_pretrained(saved, config=tiny_model().config)
    assert model.config.hidden_size == 32


def test_shape_mismatch_names_tensor_and_shapes(saved):
    _rewrite_weights(saved, lambda sd: {**sd, "lm_head.linear.bias": torch.zeros(7)})
    expect_error(AREA, "tensor of the wrong shape", _load(saved), CheckpointFolderError,
                 r"shape mismatches \(1\): lm_head\.linear\.bias: checkpoint \(7,\) vs model \(40,\)")
    model = FPMGMForMaskedGeneration.from_pretrained(saved, ignore_mismatched_sizes=True)  # explicit opt-in
    assert model.lm_head.linear.bias.shape == (40,)


@pytest.mark.parametrize("name", ["generation_config.json", "config.json"])
def test_unparsable_json_names_the_file(saved, name):
    (saved / name).write_text('{"sampler": "confidence",')
    (saved / MANIFEST_NAME).unlink()
    expect_error(AREA, f"{name} that is not valid JSON", _load(saved), CheckpointFolderError,
                 rf"{name}: not valid JSON")


@pytest.mark.parametrize("name, field, value", [("generation_config.json", "num_steps", -3),
                                                ("config.json", "num_attention_heads", 5)])
def test_invalid_config_value_names_the_file(saved, name, field, value):
    data = json.loads((saved / name).read_text())
    (saved / name).write_text(json.dumps(dict(data, **{field: value})))
    (saved / MANIFEST_NAME).unlink()
    expect_error(AREA, f"{name} with an invalid value ({field}={value})", _load(saved), CheckpointFolderError,
                 rf"{name}: .*`{field}`")


@pytest.mark.parametrize("damage", ["bit flip", "appended bytes"])
def test_manifest_catches_flips_and_appended_bytes(saved, damage):
    path = saved / "model.safetensors"
    blob = bytearray(path.read_bytes())
    if damage == "bit flip":
        blob[len(blob) - 100] ^= 0x01  # inside the tensor data: the file still parses
    else:
        blob += b"\0" * 8
    path.write_bytes(bytes(blob))
    expect_error(AREA, f"{damage} in model.safetensors", _load(saved), CheckpointFolderError,
                 r"model\.safetensors: " + ("content changed" if damage == "bit flip" else r"\d+ bytes, \d+ when"))
    assert main(["verify", str(saved)]) == 1


def test_added_weight_file_is_refused(saved):
    shutil.copy(saved / "model.safetensors", saved / "model-00001-of-00002.safetensors")
    (saved / "training_args.bin").write_bytes(b"not a model file: ignored")
    expect_error(AREA, "weights file added after the save", _load(saved), CheckpointFolderError,
                 r"model-00001-of-00002\.safetensors: not listed")


def test_folder_without_manifest_loads_with_a_warning(saved, caplog):
    (saved / MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING):
        model = FPMGMForMaskedGeneration.from_pretrained(saved)
    assert any(MANIFEST_NAME in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(model.lm_head.linear.weight, tiny_model().lm_head.linear.weight)
    record(AREA, "folder saved by an older version (no manifest)", "loads, with a warning")


def test_deliberate_edit_then_update(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(config, fp_max_iter=5)))
    with pytest.raises(CheckpointFolderError, match=r"validation_fpmgm update"):
        FPMGMForMaskedGeneration.from_pretrained(saved)
    assert main(["update", str(saved)]) == 0
    assert FPMGMForMaskedGeneration.from_pretrained(saved).config.fp_max_iter == 5


def test_bare_model_loads_from_a_checkpoint_with_a_head(saved):
    model = FPMGMModel.from_pretrained(saved)  # lm_head.* are expected leftovers, not an error
    torch.testing.assert_close(model.embed_tokens.weight, tiny_model().model.embed_tokens.weight)


def test_vq_model_is_checked_too(tmp_path):
    VQVAEModel(VQVAEConfig(hidden_channels=8, codebook_size=16, code_dim=4)).save_pretrained(tmp_path / "vq")
    _rewrite_weights(tmp_path / "vq", lambda sd: {k: v for k, v in sd.items() if "decoder" not in k})
    expect_error(AREA, "VQ tokenizer missing its decoder tensors", _load(tmp_path / "vq", VQVAEModel),
                 CheckpointFolderError, r"missing tensors \(\d+; .*decoder")


def _fake_hub_cache(cache: Path, folder: Path, repo: str = "someone/tiny-fpmgm") -> Path:
    """The layout huggingface_hub leaves after a download: snapshot files are symlinks into blobs/."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap, blobs = root / "snapshots" / commit, root / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(folder.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    return blobs


def test_hub_snapshot_is_verified(saved, tmp_path):
    blobs = _fake_hub_cache(tmp_path / "cache", saved)
    kw = dict(cache_dir=str(tmp_path / "cache"), local_files_only=True)
    model = FPMGMForMaskedGeneration.from_pretrained("someone/tiny-fpmgm", **kw)
    torch.testing.assert_close(model.lm_head.linear.weight, tiny_model().lm_head.linear.weight)
    weights = max(blobs.iterdir(), key=lambda p: p.stat().st_size)  # model.safetensors's blob
    blob = bytearray(weights.read_bytes())
    blob[-50] ^= 0x10
    weights.write_bytes(bytes(blob))
    expect_error(AREA, "bit flip in a Hub cache blob", _load("someone/tiny-fpmgm", **kw), CheckpointFolderError,
                 r"someone/tiny-fpmgm: files differ .*\n  model\.safetensors: content changed")


# ------------------------------------------------------------------------------------------- atomic saves


def test_save_into_a_used_folder_keeps_other_files_and_drops_old_shards(tmp_path):
    out = tmp_path / "m"
    tiny_model(num_pre_layers=3).save_pretrained(out, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()
    (out / "tokenizer_config.json").write_text("{}")
    (out / "vq").mkdir()
    (out / "vq" / "keep.txt").write_text("vq")
    tiny_model().save_pretrained(out)
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer_config.json", "vq", "model.safetensors"} <= names
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")]
    assert (out / "vq" / "keep.txt").read_text() == "vq"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary siblings left
    assert FPMGMForMaskedGeneration.from_pretrained(out).config.num_pre_layers == 1


def _save_in_child(model, out: Path, delay: float) -> float:
    """Fork; the child saves `model` into `out` and is killed by SIGALRM's default action after `delay` s (no
    Python cleanup runs, like SIGKILL); with `delay=0` it saves and exits. Returns the child's lifetime (s)."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            # A progress bar would take tqdm's lock, which a thread of the parent may have held at the fork.
            transformers_logging.disable_progress_bar()
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            if delay:
                signal.setitimer(signal.ITIMER_REAL, delay)
            model.save_pretrained(out)
            if delay:
                time.sleep(5)  # the timer may not have fired yet: every such child dies by the signal
        finally:
            os._exit(0)
    deadline = time.monotonic() + 10  # a stuck child is killed: one more kill
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    return time.perf_counter() - t0


def test_save_killed_at_random_moments_leaves_old_or_new_never_a_mix(tmp_path):
    a, b = tiny_model(seed=0), tiny_model(seed=1, num_pre_layers=2)
    out = tmp_path / "m"
    a.save_pretrained(out)
    duration = sorted(_save_in_child(b, out, 0) for _ in range(3))[1]  # a whole save in a forked child
    rng, trials, seen = random.Random(0), 20, {"old": 0, "new": 0, "mixed or unloadable": 0}
    for _ in range(trials):
        a.save_pretrained(out)
        _save_in_child(b, out, rng.uniform(0.0, duration / 2))  # the lifetime includes fork and exit
        try:
            model = FPMGMForMaskedGeneration.from_pretrained(out)
            ref = a if model.config.num_pre_layers == 1 else b
            same = all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), ref.state_dict().values(),
                                                         strict=True))
            seen["old" if ref is a and same else "new" if same else "mixed or unloadable"] += 1
        except (OSError, ValueError):
            seen["mixed or unloadable"] += 1
    bad = seen["mixed or unloadable"]
    record("atomic save", "save_pretrained of model B over model A killed at a random moment",
           f"old A {seen['old']}x, new B {seen['new']}x, mixed or unloadable {bad}x", tried=trials, failures=bad)
    assert bad == 0, seen
    a.save_pretrained(out)  # the next save cleans up what the killed ones left
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
