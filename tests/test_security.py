"""No code runs unless asked: planted payloads (each creates a marker folder when it runs) in a resumed training
checkpoint and in tokenizer / model folders stay inert; the explicit opt-in shows that each payload is real.
The Lightning `.ckpt` payloads are in test_mdlm_import.py."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import tiny_model
from payloads import MarkerPayload, marker_code, plant_tokenizer_code
from reliability_table import expect_error, record
from test_evaluation import tiny_lm, tiny_tokenizer
from test_train import assets, base_args, losses, run  # noqa: F401 - `assets` is a fixture

from fpmgm_hf import FPMGMForMaskedGeneration
from fpmgm_hf.data import load_training_tokenizer
from fpmgm_hf.validation_fpmgm import write_manifest

AREA = "security"


@pytest.fixture
def checkpoint(assets, tmp_path):  # noqa: F811
    """A run stopped after 2 of 4 steps (with an EMA): its `step_2` checkpoint, and how to resume it."""
    out = tmp_path / "run"
    run(base_args(assets, out, **{"--max-steps": 2, "--ema": 0.9}))
    resume = base_args(assets, out, **{"--max-steps": 4, "--ema": 0.9, "--resume": "latest"})
    return out / "checkpoints" / "step_2", resume


def _plant(path, marker) -> None:
    torch.save({"state": {}, "param_groups": [], "x": MarkerPayload(marker)}, path)


def test_checkpoint_is_pickle_free_except_the_weights_only_optimizer(checkpoint):
    ckpt, _ = checkpoint
    names = sorted(os.listdir(ckpt))
    assert {"ema.safetensors", "rng_state_0.safetensors", "model.safetensors", "checksums.json"} <= set(names)
    assert [n for n in names if n.endswith((".pkl", ".pt"))] == [], names  # optimizer.bin is the one pickle


def test_planted_custom_checkpoint_pickle_is_refused(checkpoint, tmp_path):
    ckpt, resume = checkpoint
    marker = tmp_path / "PAYLOAD_RAN"
    _plant(ckpt / "custom_checkpoint_0.pkl", marker)
    expect_error(AREA, "--resume with a planted custom_checkpoint_0.pkl (Accelerate would unpickle it)",
                 lambda: run(resume), ValueError, r"custom_checkpoint_0\.pkl.*refusing")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the safe loader refuses it too; weights_only=False would run it
        torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True)
    torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)
    assert marker.is_dir()


def test_planted_optimizer_pickle_is_refused(checkpoint, tmp_path):
    ckpt, resume = checkpoint
    marker = tmp_path / "PAYLOAD_RAN"
    _plant(ckpt / "optimizer.bin", marker)
    expect_error(AREA, "--resume with a payload in optimizer.bin", lambda: run(resume), ValueError,
                 r"optimizer\.bin: \d+ bytes, \d+ when saved")
    write_manifest(str(ckpt))  # an attacker can rewrite the manifest too: the safe unpickler still holds
    expect_error(AREA, "... and with checksums.json rewritten to match", lambda: run(resume), ValueError,
                 r"safe loader refuses.*nothing was run")
    assert not marker.exists()


def test_planted_accelerate_rng_pickle_stays_inert_and_resume_is_exact(checkpoint, assets, tmp_path):  # noqa: F811
    ckpt, resume = checkpoint
    marker = tmp_path / "PAYLOAD_RAN"
    _plant(ckpt / "random_states_0.pkl", marker)
    write_manifest(str(ckpt))
    run(resume)
    assert not marker.exists()
    full = tmp_path / "full"
    run(base_args(assets, full, **{"--max-steps": 4, "--ema": 0.9}))
    exact = losses(full) == losses(ckpt.parents[1])
    record(AREA, "--resume with a payload in Accelerate's random_states_0.pkl",
           "not run (read weights_only by Accelerate, then ignored); our rng_state_0.safetensors restores the "
           f"run {'bit-identically' if exact else 'NOT exactly'}", failures=0 if exact else 1)
    assert exact


def test_training_tokenizer_code_runs_only_with_the_flag(assets, tmp_path):  # noqa: F811
    import shutil

    tok = shutil.copytree(assets.tok, tmp_path / "tok")
    marker = tmp_path / "PAYLOAD_RAN"
    plant_tokenizer_code(tok, marker)
    argv = base_args(assets, tmp_path / "run", **{"--tokenizer": str(tok), "--max-steps": 1})
    expect_error(AREA, "fpmgm-train --tokenizer DIR whose auto_map points at planted code", lambda: run(argv),
                 ValueError, r"wants to run its own Python code.*--trust-remote-code")
    assert not marker.exists()
    load_training_tokenizer(str(tok), trust_remote_code=True)  # the explicit opt-in runs the planted module
    assert marker.is_dir()


def test_eval_sweep_runs_no_code_from_the_model_folder(tmp_path):
    from fpmgm_hf.evaluation import main as eval_main

    folder = tmp_path / "m"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    marker = tmp_path / "MODEL_CODE_RAN"
    with open(folder / "modeling_fpmgm.py", "a") as f:
        f.write("\n" + marker_code(marker))
    write_manifest(str(folder))
    argv = ["sweep", "--model", str(folder), "--budgets", "6", "--reuse", "none", "--num-samples", "1",
            "--seq-len", "4", "--batch-size", "1", "--eval-lm", str(tiny_lm(tmp_path / "lm")), "--out",
            str(tmp_path / "sweep")]
    assert eval_main(argv) == 0
    assert not marker.exists()
    record(AREA, "fpmgm-eval sweep --model DIR with planted modeling code", "not run: fpmgm_hf's own model class")
    tok_marker = tmp_path / "TOKENIZER_CODE_RAN"
    plant_tokenizer_code(folder, tok_marker)
    write_manifest(str(folder))  # a consistent folder (else the edited tokenizer_config.json is refused first)
    expect_error(AREA, "fpmgm-eval sweep --model DIR whose tokenizer auto_map points at planted code",
                 lambda: eval_main(argv[:-1] + [str(tmp_path / "sweep2")]), ValueError, r"--trust-remote-code")
    assert not tok_marker.exists() and not marker.exists()


def test_converter_tokenizer_code_runs_only_with_the_flag(tmp_path):
    import importlib.util

    from test_mdlm_import import REPO, mdlm_state_dict, write_hub_folder
    from test_mdlm_import import tiny_tokenizer as mdlm_tokenizer

    spec = importlib.util.spec_from_file_location("fpmgm_convert_script", REPO / "conversion" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    marker = tmp_path / "PAYLOAD_RAN"
    tok = plant_tokenizer_code(mdlm_tokenizer(tmp_path / "tok"), marker)
    hub = write_hub_folder(tmp_path / "mdlm", mdlm_state_dict(0))
    argv = ["--mdlm", str(hub), "--output", str(tmp_path / "out"), "--dry-run", "--tokenizer", str(tok)]
    expect_error(AREA, "conversion/convert.py --tokenizer DIR with planted auto_map code",
                 lambda: convert.main(argv), ValueError, r"--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_remote_code_load_of_a_saved_folder_checks_the_manifest(tmp_path):
    """The checks ship with the Hub code: a process without fpmgm_hf refuses a flipped weight file too."""
    from remote_helpers import run_isolated

    save = tmp_path / "saved"
    tiny_model().save_pretrained(save)
    blob = bytearray((save / "model.safetensors").read_bytes())
    blob[-10] ^= 0x04
    (save / "model.safetensors").write_bytes(bytes(blob))
    result = run_isolated(f"""
        import json
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained({str(save)!r}, trust_remote_code=True)
            print(json.dumps({{"error": None}}))
        except OSError as err:
            print(json.dumps({{"error": str(err)}}))
        """, tmp_path)
    assert "model.safetensors: content changed" in result["error"]
    assert json.loads((save / "checksums.json").read_text())["files"]["modeling_fpmgm.py"]["size"] > 0
    assert FPMGMForMaskedGeneration  # the local class is what loads without trust_remote_code


def test_an_evaluation_lm_with_its_own_code_is_refused_without_asking(tmp_path):
    import json
    import subprocess
    import sys

    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model", "AutoConfig": "evil.Config"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("open('PWNED', 'w').write('ran')\nraise SystemExit('planted code ran')\n")
    code = ("from fpmgm_hf.evaluation.metrics import load_eval_lm\n"
            f"try:\n    model, _, _ = load_eval_lm({str(folder)!r}, offline_fallback=False)\n"
            "    print('loaded', type(model).__name__)\n"
            "except Exception as err:\n    print('refused:', type(err).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    # Without the flag the folder's code never runs and nothing asks: transformers' own GPT-2 class or a refusal.
    assert ("loaded GPT2LMHeadModel" in proc.stdout or "refused" in proc.stdout) and "Do you wish" not in out, out
    assert not (tmp_path / "PWNED").exists() and "planted code ran" not in out
