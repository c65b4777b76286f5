"""Accelerate-native runs of fpmgm-train: trackers (the JSONL log is one), checkpoint rotation, `--resume latest`
meaning "continue if there is a checkpoint", no duplicate log records after a resume, LoRA with merged or kept
adapters, and the exported card / Hub push."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import yaml
from accelerate.tracking import GeneralTracker
from test_train import assets, base_args, read_log, run  # noqa: F401 - `assets` is a fixture

from fpmgm_hf import FPMGMForMaskedGeneration
from fpmgm_hf.training.loop import Trainer


class Recorder(GeneralTracker):
    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.records, self.config = [], None

    @property
    def tracker(self):
        return self.records

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.records.append((step, dict(values)))


def train(argv, **kwargs):
    from test_train import reset_accelerate

    from fpmgm_hf.training.train import main

    reset_accelerate()
    return main(argv, **kwargs)


def steps_logged(out, key="loss"):
    return [r["step"] for r in read_log(out) if key in r]


def test_every_record_goes_through_the_accelerate_trackers(assets, tmp_path):  # noqa: F811
    out, recorder = tmp_path / "run", Recorder()
    train(base_args(assets, out, **{"--max-steps": 2, "--save-every": 0}), log_with=[recorder])
    logged = [{k: v for k, v in r.items() if k != "time"} for r in read_log(out)]
    assert [values for _, values in recorder.records] == logged  # log.jsonl is one tracker among the others
    assert [step for step, _ in recorder.records] == [r.get("step") for r in logged]
    assert recorder.config["seq_len"] == 24 and "data_fingerprint" in recorder.config
    with pytest.raises(ValueError, match=r"--report-to: unknown tracker\(s\) \['bogus'\]"):
        train(base_args(assets, tmp_path / "x", **{"--report-to": "bogus"}))


def test_save_total_limit_keeps_the_newest_checkpoints_and_resume_continues(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(base_args(assets, out, **{"--max-steps": 4, "--save-every": 1, "--save-total-limit": 2}))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_3", "step_4"]
    train(base_args(assets, out, **{"--max-steps": 5, "--save-every": 1, "--save-total-limit": 2,
                                    "--resume": "latest"}))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_4", "step_5"]
    assert steps_logged(out) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="--save-total-limit must be >= 1, got 0"):
        train(base_args(assets, out, **{"--save-total-limit": 0}))


def test_resume_latest_without_a_checkpoint_starts_fresh(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(base_args(assets, out, **{"--max-steps": 2, "--resume": "latest"}))
    assert steps_logged(out) == [1, 2] and not any(r.get("event") == "resume" for r in read_log(out))


def test_a_resumed_run_logs_every_step_once(assets, tmp_path):  # noqa: F811
    """A run killed after logging step 3 (its last checkpoint: step 2) is resumed: step 3 is re-run and logged
    once; a fresh run in the same folder is refused, and --overwrite starts over."""
    out = tmp_path / "run"
    real_step = Trainer.train_step

    def crash_after_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self)

    with mock.patch.object(Trainer, "train_step", crash_after_step_3), pytest.raises(KeyboardInterrupt):
        train(base_args(assets, out, **{"--max-steps": 4, "--eval-every": 1}))
    assert steps_logged(out) == [1, 2, 3] and sorted(os.listdir(out / "checkpoints")) == ["step_2"]
    train(base_args(assets, out, **{"--max-steps": 4, "--eval-every": 1, "--resume": "latest"}))
    assert steps_logged(out) == [1, 2, 3, 4] and steps_logged(out, "val_nelbo") == [0, 1, 2, 3, 4]
    assert [r["step"] for r in read_log(out) if r.get("event") == "resume"] == [2]
    with pytest.raises(FileExistsError, match="earlier run.*--resume latest.*--overwrite"):  # never a silent restart
        train(base_args(assets, out, **{"--max-steps": 1, "--save-every": 0}))
    assert steps_logged(out) == [1, 2, 3, 4]  # untouched
    with pytest.raises(ValueError, match="give only one"):
        train(base_args(assets, out, **{"--resume": "latest"}) + ["--overwrite"])
    train(base_args(assets, out, **{"--max-steps": 1, "--save-every": 0}) + ["--overwrite"])
    assert steps_logged(out) == [1] and not (out / "checkpoints").exists()  # the old run's checkpoints are gone


def test_lora_merged_or_kept_adapter(assets, tmp_path):  # noqa: F811
    from peft import PeftModel

    base_dir = train(base_args(assets, tmp_path / "base", **{"--max-steps": 2, "--save-every": 0}))
    with pytest.raises(ValueError, match="--lora-r trains adapters on a trained model: give --from"):
        train(base_args(assets, tmp_path / "x", **{"--lora-r": 2}))
    def lora(out, *extra):
        argv = base_args(assets, out, **{"--from": base_dir, "--lora-r": 2, "--max-steps": 2, "--lr": "1e-2"})
        i = argv.index("--config")
        return train(argv[:i] + argv[i + 2:] + list(extra))

    merged = lora(tmp_path / "merged")
    kept = lora(tmp_path / "kept", "--keep-adapter")
    assert "adapter_config.json" not in os.listdir(merged)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(kept))
    state = json.loads((tmp_path / "merged" / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["lora_r"] == 2
    x, t = torch.randint(0, 20, (2, 24), generator=torch.Generator().manual_seed(0)), torch.full((2,), 0.5)
    logits = lambda m: m.eval()(x, timesteps=t).logits  # noqa: E731
    want = logits(FPMGMForMaskedGeneration.from_pretrained(merged))
    torch.testing.assert_close(logits(FPMGMForMaskedGeneration.from_pretrained(kept)), want)
    with_base = PeftModel.from_pretrained(FPMGMForMaskedGeneration.from_pretrained(base_dir), kept)
    torch.testing.assert_close(logits(with_base), want)
    assert not torch.allclose(logits(FPMGMForMaskedGeneration.from_pretrained(base_dir)), want)


def test_export_writes_a_public_card_pushes_it_and_its_snippet_runs(assets, tmp_path):  # noqa: F811
    out, seen = tmp_path / "tiny-run", {}

    def upload_folder(*, repo_id, folder_path, revision, commit_message):
        seen.update(repo=repo_id, files=sorted(os.listdir(folder_path)))
        return mock.Mock(commit_url="https://hf.co/me/tiny/commit/1")

    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api_cls.return_value.upload_folder.side_effect = upload_folder
        final = train(base_args(assets, out, **{"--max-steps": 2, "--save-every": 0, "--push-to-hub": "me/tiny"}))
    assert seen["repo"] == "me/tiny" and {"README.md", "config.json", "tokenizer.json"} <= set(seen["files"])
    assert read_log(out)[-1]["event"] == "push"
    card = (out / "final" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front and front["library_name"] == "transformers"
    assert str(tmp_path) not in card and "| data | data.txt |" in card and "github.com" not in card
    assert 'repo = "me/tiny"' in card and "Trained from scratch with `fpmgm-train`" in card
    assert "| 2 |" in card  # the last validation record

    # The usage snippet, pointed at the local folder, runs in a fresh process (remote code, offline).
    snippet = card.split("```python\n")[1].split("```")[0].replace('"me/tiny"', repr(str(final)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout.startswith("["), proc.stdout[-1000:] + proc.stderr[-3000:]


def test_a_step_whose_loss_turns_nonfinite_stops_the_run_before_the_update(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    real_loss = Trainer.loss

    def nan_at_step_4(self, x0):
        loss, extra = real_loss(self, x0)
        return (loss * float("nan"), extra) if self.step == 3 else (loss, extra)

    with mock.patch.object(Trainer, "loss", nan_at_step_4), \
            pytest.raises(FloatingPointError, match="step 4.*last good"):
        train(base_args(assets, out, **{"--max-steps": 6, "--save-every": 2}))
    assert not (out / "final").exists() and sorted(os.listdir(out / "checkpoints")) == ["step_2"]
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoints" / "step_2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    for flag, value in (("--lr", "inf"), ("--lr", "0"), ("--clip", "nan"), ("--eval-every", "-1"), ("--out", "")):
        with pytest.raises(ValueError, match=flag):
            train(base_args(assets, tmp_path / "x", **{flag: value}))


def test_a_killed_export_leaves_the_old_final_folder_whole(assets, tmp_path):  # noqa: F811
    from fpmgm_hf.training import export as export_module

    out = tmp_path / "run"
    train(base_args(assets, out, **{"--max-steps": 2, "--save-every": 2}))
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}

    def killed(folder):
        raise KeyboardInterrupt("killed while writing the new final/")

    with mock.patch.object(export_module, "write_manifest", killed), pytest.raises(KeyboardInterrupt):
        train(base_args(assets, out, **{"--max-steps": 3, "--save-every": 3, "--resume": "latest"}))
    after = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    assert after == before  # every file of the old export, unchanged: nothing half-deleted
    assert not [p for p in out.iterdir() if p.name.startswith(".final.")]  # no temporary folder left behind


def test_cli_values_are_refused_by_flag(assets, tmp_path):  # noqa: F811
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4, "hiden_size": 64}))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for extra, match in (({"--config": str(bad)}, "bad.json is not a readable JSON"),
                         ({"--config": str(typo)}, r"unknown FPMGMConfig field\(s\) \['hiden_size'\]"),
                         ({"--config": str(listed)}, "JSON object"),
                         ({"--seed": str(2**70)}, "--seed"), ({"--eps": "2"}, "--eps")):
        with pytest.raises(ValueError, match=match):
            train(base_args(assets, tmp_path / "x", **extra))
    from test_mdlm_import import _convert_module

    for flag, value in (("--verify-repeats", "0"), ("--steps", "-1"), ("--tau", "0"), ("--kl-weight", "nan"),
                        ("--gap", "0.5 0.2"), ("--lr", "inf")):
        with pytest.raises(ValueError, match=flag):
            _convert_module().main(["--mdlm", "x", "--output", str(tmp_path / "c"), flag, *value.split()])
