"""One run per output folder: a second fpmgm-train / image training / conversion on a folder in use is refused
with the first run's pid; a lock left by a killed run is detected as stale and taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from reliability_table import expect_error, record
from test_train import assets, base_args, read_log, run  # noqa: F401 - `assets` is a fixture

from fpmgm_hf.training.runlock import LOCK_NAME, OutputLockedError, folder_lock, folder_lock_path, run_lock

AREA = "locks"
SRC = Path(__file__).resolve().parents[1] / "src" / "fpmgm_hf" / "training" / "runlock.py"
# Loads runlock.py by path (no torch / transformers import: starts in a fraction of a second), takes the lock,
# says so, and sleeps until killed.
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("runlock", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
with mod.run_lock(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(SRC), str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_live_lock_refuses_and_stale_lock_is_taken_over(tmp_path, caplog):
    lock = tmp_path / "out" / LOCK_NAME
    holder = _holder(lock)
    try:
        expect_error(AREA, "second run while the first holds the lock (another process)",
                     lambda: run_lock(lock).__enter__(), OutputLockedError, rf"another run \(pid {holder.pid} ")
    finally:
        _kill(holder)
    assert lock.exists()  # SIGKILL: no cleanup ran, the file is left behind
    with caplog.at_level(logging.WARNING), run_lock(lock):
        assert f'"pid": {os.getpid()}' in lock.read_text()
    assert any(f"stale lock of pid {holder.pid}" in r.getMessage() and "not running" in r.getMessage()
               for r in caplog.records)
    record(AREA, "lock file left by a run killed with SIGKILL", "taken over, with a warning naming the dead pid")
    assert not lock.exists()  # released: removed


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    lock = tmp_path / LOCK_NAME
    with run_lock(lock):
        with pytest.raises(OutputLockedError, match=rf"pid {os.getpid()} "):
            with run_lock(lock):
                pass
    with run_lock(lock):  # free again
        pass


def test_disabled_lock_is_a_no_op(tmp_path):
    with run_lock(tmp_path / LOCK_NAME, enabled=False) as path:
        assert path is None and not (tmp_path / LOCK_NAME).exists()


def test_fpmgm_train_refuses_a_folder_in_use(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    with folder_lock(out):
        expect_error(AREA, "fpmgm-train --out DIR while another run uses DIR",
                     lambda: run(base_args(assets, out, **{"--max-steps": 1})), OutputLockedError, r"in use")
    assert not (out / "log.jsonl").exists()
    run(base_args(assets, out, **{"--max-steps": 1}))
    assert not os.path.exists(folder_lock_path(out))


def test_image_training_refuses_a_folder_in_use(tmp_path):
    from test_images import TINY, K, run_main, write_grids

    from fpmgm_hf import VQVAEConfig, VQVAEModel

    VQVAEModel(VQVAEConfig(codebook_size=K, hidden_channels=8, code_dim=4)).save_pretrained(tmp_path / "vq")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    data = types.SimpleNamespace(train=str(write_grids(tmp_path / "toy_train.npz", n=32)), vq=str(tmp_path / "vq"),
                                 config=str(tmp_path / "tiny.json"))
    out = tmp_path / "img"
    with folder_lock(out):
        expect_error(AREA, "image training --out DIR while another run uses DIR",
                     lambda: run_main(data, out, "--max-steps", "1"), OutputLockedError, r"in use")
    assert not (out / "log.jsonl").exists()


def test_converter_refuses_an_output_in_use(tmp_path):
    from test_mdlm_import import _convert_module, mdlm_state_dict, write_hub_folder

    out = tmp_path / "fp"
    hub = write_hub_folder(tmp_path / "mdlm", mdlm_state_dict(0))
    with folder_lock(out):
        expect_error(AREA, "conversion/convert.py --output DIR while another conversion writes DIR",
                     lambda: _convert_module().main(["--mdlm", str(hub), "--output", str(out), "--dry-run"]),
                     OutputLockedError, r"in use")
    assert not out.exists()


def test_two_real_training_runs_on_one_folder(assets, tmp_path):  # noqa: F811
    """fpmgm-train in a subprocess (slowed down) holds the folder; a second run is refused; after the first is
    SIGKILLed, its stale lock is taken over and the run resumes from its checkpoint."""
    out = tmp_path / "run"
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import time\nimport fpmgm_hf.training.train as t\n_s = t.Trainer.train_step\n"
        "def _slow(self):\n    time.sleep(0.3)\n    return _s(self)\nt.Trainer.train_step = _slow\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")])))
    first = subprocess.Popen([sys.executable, "-m", "fpmgm_hf.training.train",
                              *base_args(assets, out, **{"--max-steps": 40}), "--cpu"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step_2").is_dir():
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended or never saved"
            time.sleep(0.05)
        expect_error(AREA, "two real fpmgm-train runs with the same --out", lambda: run(base_args(
            assets, out, **{"--max-steps": 4})), OutputLockedError, rf"pid {first.pid} ")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    run(base_args(assets, out, **{"--max-steps": 4, "--resume": "latest"}))
    assert [r["event"] for r in read_log(out) if r.get("event") == "resume"] == ["resume"]
    assert not os.path.exists(folder_lock_path(out))


def test_one_lock_per_output_folder_across_tools(tmp_path):
    """While one tool writes an output folder, every other tool writing there is refused by name: a training
    run's lock (in another process) refuses the converter, with --overwrite too, and a sweep."""
    from conftest import tiny_model
    from test_mdlm_import import _convert_module, mdlm_state_dict, write_hub_folder

    from fpmgm_hf.evaluation.sweep import main as sweep

    out = tmp_path / "shared"
    out.mkdir()
    hub = write_hub_folder(tmp_path / "mdlm", mdlm_state_dict(0))
    tiny_model().save_pretrained(tmp_path / "model")
    holder = _holder(Path(folder_lock_path(out)))  # e.g. fpmgm-train --out shared, in another process
    try:
        expect_error(AREA, "converter --output DIR --overwrite while fpmgm-train writes DIR",
                     lambda: _convert_module().main(["--mdlm", str(hub), "--output", str(out), "--overwrite",
                                                     "--dry-run"]), OutputLockedError, f"{out} is in use")
        expect_error(AREA, "fpmgm-eval sweep --out DIR while fpmgm-train writes DIR",
                     lambda: sweep(["sweep", "--model", str(tmp_path / "model"), "--out", str(out)]),
                     OutputLockedError, f"{out} is in use")
    finally:
        holder.kill()
        holder.wait()
    assert folder_lock_path(out) == str(tmp_path / ".shared.fpmgm.lock")
