"""Reliability: SIGKILL in the middle of the demo and of the converter loses nothing, and truncated or
corrupt weights and checkpoints are reported with the file that is bad."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from remote_helpers import run_isolated
from safetensors.torch import load_file
from test_convert import argv as convert_argv
from test_convert import convert, make_assets, read_log, train_losses
from test_evaluation import tiny_lm

REPO = Path(__file__).resolve().parents[1]
# Loaded by every Python process the test starts (PYTHONPATH): slows each optimizer step so that a kill
# lands between two checkpoints, whatever the machine's speed.
SLOW_STEPS = """
import time
try:
    import fpmgm_hf.train as _t
    _step = _t.Trainer.train_step
    def _slow(self):
        time.sleep(0.25)
        return _step(self)
    _t.Trainer.train_step = _slow
except Exception:
    pass
"""


def _spawn(cmd: list[str], tmp_path: Path, slow: bool) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    if slow:
        (tmp_path / "slow").mkdir(exist_ok=True)
        (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_STEPS)
        env["PYTHONPATH"] = str(tmp_path / "slow")
    log = open(tmp_path / f"log-{time.monotonic_ns()}.txt", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the whole process group (the launcher and its workers) as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("reliability"))


def test_converter_killed_with_sigkill_resumes_bit_identically(assets, tmp_path):
    common = ("--steps", 6, "--save-every", 2, "--eval-every", 0)
    full = tmp_path / "full"
    convert(convert_argv(assets, full, *common))
    out = tmp_path / "killed"
    cmd = [sys.executable, "conversion/convert.py", *map(str, convert_argv(assets, out, *common))]
    ckpts = tmp_path / "killed.work" / "distill" / "checkpoints"
    _kill_when(_spawn(cmd, tmp_path, slow=True), lambda: (ckpts / "step_2").is_dir())
    assert not out.exists() and not (ckpts / "step_6").exists()
    proc = _spawn(cmd + ["--resume", "latest"], tmp_path, slow=False)
    assert proc.wait(timeout=300) == 0
    log = read_log(tmp_path / "killed.work" / "distill" / "log.jsonl")
    resumed = [r["step"] for r in log if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0] >= 2
    assert train_losses(tmp_path / "killed.work" / "distill" / "log.jsonl") == train_losses(
        tmp_path / "full.work" / "distill" / "log.jsonl")
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_killed_with_sigkill_resumes_and_then_reuses_everything(assets, tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "examples/demo.py", "--out", str(out), "--data", str(assets["data"]), "--vocab-size",
           "300", "--hidden-size", "32", "--seq-len", "16", "--batch-size", "2", "--steps", "12", "--save-every", "3",
           "--convert-steps", "2", "--budgets", "12", "--samples", "2", "--eval-lm", str(tiny_lm(tmp_path / "lm"))]
    ckpts = out / "mdlm" / "checkpoints"
    _kill_when(_spawn(cmd, tmp_path, slow=True), lambda: (ckpts / "step_3").is_dir())
    assert not (out / "mdlm" / "final").exists()
    proc = _spawn(cmd, tmp_path, slow=False)
    assert proc.wait(timeout=600) == 0, max(tmp_path.glob("log-*")).read_text()[-3000:]
    log = [json.loads(line) for line in (out / "mdlm" / "log.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in log if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0] >= 3  # continued from a checkpoint, not from scratch
    steps = [r["step"] for r in log if "loss" in r]
    assert max(steps) == 12 and set(range(1, 13)) <= set(steps)
    report = (out / "report.md").read_text()
    assert "| MDLM (6 layers) |" in report and "CoFRe FP-MDLM (1/1/1)" in report
    assert (out / "fp-mdlm" / "README.md").is_file() and (out / "fp-mdlm" / "config.json").is_file()
    stamp = (out / "fp-mdlm" / "model.safetensors").stat().st_mtime_ns
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("already done, reusing it") == 4  # tokenizer, training, conversion, sweep
    assert (out / "fp-mdlm" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("cut", ["half", "header"])
def test_truncated_model_safetensors_names_the_file(tmp_path, cut):
    from fpmgm_hf import FPMGMForMaskedGeneration

    save = tmp_path / "m"
    tiny_model().save_pretrained(save)
    blob = (save / "model.safetensors").read_bytes()
    (save / "model.safetensors").write_bytes(blob[: len(blob) // 2] if cut == "half" else blob[:5])
    with pytest.raises(OSError, match=r"model\.safetensors: truncated"):
        FPMGMForMaskedGeneration.from_pretrained(save)
    if cut == "header":
        return
    result = run_isolated(f"""
        import json
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained({str(save)!r}, trust_remote_code=True)
            print(json.dumps({{"error": None}}))
        except OSError as err:
            print(json.dumps({{"error": str(err)}}))
        """, tmp_path)
    assert "model.safetensors: truncated" in result["error"]  # the check ships with the Hub code


def test_corrupt_training_checkpoint_is_reported_on_resume(tmp_path):
    from fpmgm_hf import train

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran far away .\n" * 200)
    from fpmgm_hf.data import train_bpe_tokenizer

    train_bpe_tokenizer([text.read_text()], 300, str(tmp_path / "tok"))
    (tmp_path / "arch.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4, "cond_dim": 16,
                                                    "max_position_embeddings": 16}))
    args = ["--data", str(text), "--tokenizer", str(tmp_path / "tok"), "--config", str(tmp_path / "arch.json"),
            "--seq-len", "16", "--batch-size", "2", "--max-steps", "2", "--save-every", "2", "--eval-every", "0",
            "--out", str(tmp_path / "run"), "--cpu"]
    train.main(args)
    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    opt = ckpt / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"step_2.*truncated or corrupt[\s\S]*optimizer\.bin"):
        train.main(args[:-3] + ["--max-steps", "4", "--out", str(tmp_path / "run"), "--cpu", "--resume", "latest"])
