"""Malformed resume state (issue 26, finding 9): a checkpoint whose counters, random states or EMA metadata are
damaged is refused on `--resume` with an error naming the file, never a raw KeyError / TypeError, and never
resumed from a wrong step. The manifest is removed first (an earlier version's checkpoint, or one whose
manifest was rewritten with it), so these checks stand on their own. Rows of the reliability table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_text_run
from reliability_table import expect_error
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fpmgm_hf.validation_fpmgm import MANIFEST_NAME


def _edit_state(**fields):
    def edit(ckpt: Path):
        path = ckpt / "trainer_state.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return edit


def _edit_safetensors(name: str, meta=None, tensors=None):
    def edit(ckpt: Path):
        path = ckpt / name
        saved = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        metadata.update(meta or {})
        saved.update(tensors(saved) if tensors else {})
        save_file(saved, path, metadata=metadata)
    return edit


def _write(text: str):
    def edit(ckpt: Path):
        (ckpt / "trainer_state.json").write_text(text)
    return edit


CASES = {  # case -> (edit, file the error must name, words it must contain)
    "trainer_state.json that is not JSON": (_write('{"step": 2,'), "trainer_state.json", "JSON"),
    "trainer_state.json holding a list": (_write("[2]"), "trainer_state.json", "not a JSON object"),
    "trainer_state.json without `step`": (_edit_state(step=None), "trainer_state.json", "step"),
    "trainer_state.json with step -5": (_edit_state(step=-5), "trainer_state.json", "step"),
    "trainer_state.json with step 10**9 in folder step_2": (_edit_state(step=10**9), "trainer_state.json", "step 2"),
    "trainer_state.json with step '2' (a string)": (_edit_state(step="2"), "trainer_state.json", "step"),
    "trainer_state.json with baseline_ppl NaN": (_write('{"step": 2, "baseline_ppl": NaN}'), "trainer_state.json",
                                                 "baseline_ppl"),
    "random states: python metadata not JSON": (_edit_safetensors("rng_state_0.safetensors", {"python": "[1,"}),
                                                "rng_state_0.safetensors", "malformed"),
    "random states: numpy metadata of the wrong arity": (
        _edit_safetensors("rng_state_0.safetensors", {"numpy": "[1, 2]"}), "rng_state_0.safetensors", "malformed"),
    "random states: generator state of the wrong shape": (
        _edit_safetensors("rng_state_0.safetensors", tensors=lambda t: {"generator": t["generator"][:7]}),
        "rng_state_0.safetensors", "malformed"),
    "EMA decay 'nan'": (_edit_safetensors("ema.safetensors", {"decay": "nan"}), "ema.safetensors", "decay"),
    "EMA decay 1.5": (_edit_safetensors("ema.safetensors", {"decay": "1.5"}), "ema.safetensors", "decay"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fpmgm_hf.training import train

    root = tmp_path_factory.mktemp("resume_state")
    args = tiny_text_run(root) + ["--ema", "0.9"]
    train.main(args + ["--max-steps", "2", "--out", str(root / "run")])
    return root, args


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_resume_state_is_refused_naming_the_file(run, case, tmp_path):
    from fpmgm_hf.training import train

    root, args = run
    edit, name, words = CASES[case]
    out = Path(shutil.copytree(root / "run", tmp_path / "run"))
    ckpt = out / "checkpoints" / "step_2"
    (ckpt / MANIFEST_NAME).unlink()
    edit(ckpt)
    expect_error("resume state", f"fpmgm-train --resume with {case}",
                 lambda: train.main(args + ["--max-steps", "4", "--out", str(out), "--resume", "latest"]),
                 ValueError, rf"{name}[\s\S]*{words}|{words}[\s\S]*{name}")
