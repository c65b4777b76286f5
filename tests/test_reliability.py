"""Reliability: SIGKILL in the middle of the demo and of the converter loses nothing (and the lock the killed run
leaves is taken over), truncated or corrupt weights and checkpoints are reported with the file that is bad, and
a hypothesis suite of corrupted files gets a clear error naming the file every time. Rows of the reliability
table (tests/reliability_table.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model, tiny_text_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_table import record
from remote_helpers import run_isolated
from safetensors.torch import load_file
from test_convert import argv as convert_argv
from test_convert import convert, make_assets, read_log, train_losses
from test_evaluation import tiny_lm

from fpmgm_hf.validation_fpmgm import MANIFEST_NAME, CheckpointFolderError

REPO = Path(__file__).resolve().parents[1]
# Loaded by every Python process the test starts (PYTHONPATH): slows each optimizer step so that a kill
# lands between two checkpoints, whatever the machine's speed.
SLOW_STEPS = """
import time
try:
    import fpmgm_hf.training.train as _t
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
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "slow"), os.environ.get("PYTHONPATH")]))
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
    assert (tmp_path / ".killed.fpmgm.lock").is_file()  # left by the killed run: stale
    proc = _spawn(cmd + ["--resume", "latest"], tmp_path, slow=False)
    assert proc.wait(timeout=300) == 0
    assert not (tmp_path / ".killed.fpmgm.lock").exists()  # taken over, then released
    log = read_log(tmp_path / "killed.work" / "distill" / "log.jsonl")
    resumed = [r["step"] for r in log if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0] >= 2
    assert train_losses(tmp_path / "killed.work" / "distill" / "log.jsonl") == train_losses(
        tmp_path / "full.work" / "distill" / "log.jsonl")
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_killed_with_sigkill_resumes_and_then_reuses_everything(assets, tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "examples/demo.py", "--out", str(out), "--data", str(assets["data"]),
           "--hidden-size", "32", "--seq-len", "16", "--batch-size", "2", "--steps", "12", "--save-every", "3",
           "--convert-steps", "2", "--lm-steps", "4", "--budgets", "12", "--samples", "2",
           "--eval-lm", str(tiny_lm(tmp_path / "lm"))]
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
    assert "| MDLM (6 layers) |" in report and "converted FP-MDLM (1/1/1)" in report
    assert "in-domain char LM" in report and "general LM" in report  # both evaluators score the same samples
    assert (out / "fp-mdlm" / "README.md").is_file() and (out / "fp-mdlm" / "config.json").is_file()
    stamp = (out / "fp-mdlm" / "model.safetensors").stat().st_mtime_ns
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("already done, reusing it") == 5  # tokenizer, MDLM, char LM, conversion, sweep
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
    from fpmgm_hf.training import train

    args = tiny_text_run(tmp_path) + ["--out", str(tmp_path / "run")]
    train.main(args + ["--max-steps", "2"])
    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    opt = ckpt / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"step_2.*truncated or corrupt[\s\S]*optimizer\.bin"):
        train.main(args + ["--max-steps", "4", "--resume", "latest"])


# ------------------------------------------------------------------------------------ corrupted files (fuzz)

FUZZ_FILES = ("model.safetensors", "config.json", "generation_config.json", MANIFEST_NAME)
DAMAGE = st.tuples(st.sampled_from(["flip", "truncate", "append", "overwrite"]), st.floats(0, 1, exclude_max=True),
                   st.integers(0, 7), st.binary(min_size=1, max_size=16))
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def damage(blob: bytes, kind: str, where: float, bit: int, data: bytes) -> bytes:
    pos = int(where * len(blob))
    if kind == "flip":
        return blob[:pos] + bytes([blob[pos] ^ (1 << bit)]) + blob[pos + 1:]
    if kind == "truncate":
        return blob[:pos]
    if kind == "append":
        return blob + data
    return blob[:pos] + data + blob[pos + len(data):]


def _fuzz(case_name: str, outcome_of, strategy):
    """Run hypothesis over `strategy`; `outcome_of(example)` returns (ok, label). Records one row."""
    seen: dict[str, int] = {}

    @FUZZ
    @given(strategy)
    def check(example):
        ok, label = outcome_of(example)
        seen[label] = seen.get(label, 0) + 1
        assert ok, label

    try:
        check()
    finally:
        bad = sum(n for label, n in seen.items() if label.startswith("FAILURE"))
        got = ", ".join(f"{label} {n}x" for label, n in sorted(seen.items(), key=lambda kv: -kv[1]))
        record("fuzz", case_name, got, tried=sum(seen.values()), failures=bad)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "m"
    tiny_model().save_pretrained(folder)
    return folder


def _model_outcome(template: Path, example) -> tuple[bool, str]:
    from fpmgm_hf import FPMGMForMaskedGeneration

    name, (kind, where, bit, data) = example
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(template, Path(tmp) / "m"))
        blob = (folder / name).read_bytes()
        new = damage(blob, kind, where, bit, data)
        (folder / name).write_bytes(new)
        try:
            FPMGMForMaskedGeneration.from_pretrained(folder)
        except CheckpointFolderError as err:
            named = name in str(err) or name == MANIFEST_NAME  # a damaged manifest may name the file it misjudges
            return named, "refused, naming the file" if named else f"FAILURE: refused without naming {name}"
        except Exception as err:  # noqa: BLE001 - anything else is a failure of the check
            return False, f"FAILURE: {type(err).__name__}"
    if new == blob:
        return True, "loaded (bytes unchanged)"
    if name == MANIFEST_NAME:
        return True, "loaded (only the manifest's formatting changed; every file verified)"
    return False, "FAILURE: loaded a damaged folder"


def test_fuzz_corrupted_model_folders(saved_model):
    _fuzz("save_pretrained folder: a flip, cut, append or overwrite in one of " + ", ".join(FUZZ_FILES),
          lambda ex: _model_outcome(saved_model, ex), st.tuples(st.sampled_from(FUZZ_FILES), DAMAGE))


@pytest.fixture(scope="module")
def mdlm_files(tmp_path_factory):
    from test_mdlm_import import mdlm_parameter_names, mdlm_state_dict, write_hub_folder, write_lightning_ckpt

    root = tmp_path_factory.mktemp("fuzz_mdlm")
    raw = mdlm_state_dict(0)
    assert len(mdlm_parameter_names(3)) == len(raw) - 1
    write_hub_folder(root / "hub", raw)
    write_lightning_ckpt(root / "last.ckpt", raw, mdlm_state_dict(1))
    return root


def _mdlm_outcome(root: Path, example) -> tuple[bool, str]:
    from fpmgm_hf.conversion.mdlm_import import MDLMCheckpointError, load_mdlm_checkpoint

    name, (kind, where, bit, data) = example
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(root / "hub", Path(tmp) / "hub")
        shutil.copy(root / "last.ckpt", Path(tmp) / "last.ckpt")
        path = Path(tmp) / name
        blob = path.read_bytes()
        path.write_bytes(damage(blob, kind, where, bit, data))
        source = Path(tmp) / ("last.ckpt" if name == "last.ckpt" else "hub")
        try:
            load_mdlm_checkpoint(source)
        except MDLMCheckpointError as err:
            named = str(source) in str(err)
            return named, "refused, naming the file" if named else "FAILURE: refused without naming the file"
        except Exception as err:  # noqa: BLE001
            return False, f"FAILURE: {type(err).__name__}: {str(err)[:80]}"
    return True, "imported (no manifest: a change that keeps the file valid and finite is undetectable)"


def test_fuzz_corrupted_mdlm_checkpoints(mdlm_files):
    files = ("hub/model.safetensors", "hub/config.json", "last.ckpt")
    _fuzz("MDLM import: a flip, cut, append or overwrite in " + ", ".join(files),
          lambda ex: _mdlm_outcome(mdlm_files, ex), st.tuples(st.sampled_from(files), DAMAGE))


def test_nonfinite_weights_are_refused_at_load_and_save_and_a_nonfinite_step_stops_the_run(tmp_path):
    from safetensors.torch import load_file, save_file

    from fpmgm_hf import FPMGMForMaskedGeneration
    from fpmgm_hf.validation_fpmgm import CheckpointFolderError, write_manifest

    folder = tmp_path / "m"
    FPMGMForMaskedGeneration(tiny_config()).save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    name = "model.fp_blocks.0.mlp.0.weight"
    weights[name][0, 0] = float("inf")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    write_manifest(folder)  # a consistent folder whose weights are not finite
    with pytest.raises(CheckpointFolderError, match=f"NaN or inf: {name}.*allow_nonfinite"):
        FPMGMForMaskedGeneration.from_pretrained(folder)
    model = FPMGMForMaskedGeneration.from_pretrained(folder, allow_nonfinite=True)  # the explicit opt-out
    with pytest.raises(ValueError, match=f"save_pretrained refused.*{name}"):
        model.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_an_edited_tokenizer_or_config_is_refused_on_every_load_path(tmp_path):
    from test_evaluation import tiny_tokenizer

    from fpmgm_hf.data import load_training_tokenizer
    from fpmgm_hf.demo.app import LoadError, load_model
    from fpmgm_hf.validation_fpmgm import CheckpointFolderError, write_manifest

    folder = tmp_path / "m"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    write_manifest(folder)  # as fpmgm-train and the converter write it: over the tokenizer files too
    assert load_model(str(folder)).tokenizer is not None
    original = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(original.replace('"w1"', '"w1x"'))
    with pytest.raises(CheckpointFolderError, match="tokenizer.json"):
        load_training_tokenizer(str(folder))  # what fpmgm-train --from and the evaluations use
    with pytest.raises(LoadError, match="tokenizer.json"):
        load_model(str(folder))  # the demo
    (folder / "tokenizer.json").write_text(original)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"dropout": 0.0', '"dropout": 0.5'))
    with pytest.raises(LoadError, match="config.json"):
        load_model(str(folder))  # the demo no longer passes its own config= around the check


def test_readers_during_concurrent_saves_get_one_save_never_a_mix(tmp_path):
    """A writer process saves model A and model B into one folder in turn; every load in this process returns the
    weights and the generation config of the same save (or, against a writer that never pauses, refuses)."""
    import subprocess
    import sys
    import textwrap
    import time

    from fpmgm_hf import FPMGMForMaskedGeneration

    folder = tmp_path / "m"
    writer = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import tiny_model
        models = []
        for tag in (11, 22):
            m = tiny_model(seed=tag)
            with torch.no_grad():
                m.model.embed_tokens.weight[0, 0] = tag  # the save's tag, in the weights
            m.generation_config.budget = tag  # and in the generation config
            models.append(m)
        models[0].save_pretrained({str(folder)!r})
        print("ready", flush=True)
        end = time.time() + 30
        while time.time() < end:
            for m in models:
                m.save_pretrained({str(folder)!r})
                time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout.readline().strip() == "ready"
        seen, refused, t0 = [], 0, time.monotonic()
        while len(seen) < 40 and time.monotonic() - t0 < 60 and proc.poll() is None:
            try:
                model = FPMGMForMaskedGeneration.from_pretrained(folder)
            except CheckpointFolderError as err:
                assert "replaced" in str(err)
                refused += 1
                continue
            seen.append((int(model.model.embed_tokens.weight[0, 0]), model.generation_config.budget))
    finally:
        proc.kill()
        proc.wait()
    assert len(seen) >= 10 and all(w == g for w, g in seen), seen  # never A's weights with B's config
    assert {w for w, _ in seen} <= {11, 22}
