"""conversion/convert.py end to end on a tiny random MDLM: the Trainer loop (checkpoints, exact resume after a
crash), the consistency stage, the model card, a mocked Hub push, LoRA and two processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_mdlm_import import _convert_module, mdlm_state_dict, tiny_tokenizer, write_hub_folder

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_assets(root: Path) -> dict:
    """A tiny random MDLM (Hub-folder layout), its tokenizer and a small text file."""
    data = root / "train.txt"
    data.write_text("the cat sat on the mat and the dog ran far away . it was a very good day .\n\n" * 40)
    return {"mdlm": write_hub_folder(root / "mdlm", mdlm_state_dict(0)), "tok": tiny_tokenizer(root / "tok"),
            "data": data}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("convert"))


def argv(assets, out, *extra):
    return ["--mdlm", str(assets["mdlm"]), "--tokenizer", str(assets["tok"]), "--map", "1,2,3",
            "--data", str(assets["data"]), "--seq-len", "16", "--batch-size", "2", "--kl-warmup", "2",
            "--verify-batch", "2", "--sample-length", "8", "--sample-steps", "2", "--val-blocks", "4",
            "--eval-batches", "2", "--output", str(out), *extra]


def convert(args):
    reset_accelerate()
    return _convert_module().main([str(a) for a in args])


def reuse_mode(folder):
    from fpmgm_hf import FPMGMForMaskedGeneration

    return FPMGMForMaskedGeneration.from_pretrained(str(folder)).generation_config.reuse


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def train_losses(path):
    out = {}
    for record in read_log(path):
        if "loss" in record:
            out[record["step"]] = record["loss"]  # a resumed step overwrites the interrupted run's record
    return out


def test_crashed_conversion_resumes_exactly(assets, tmp_path):
    common = ("--steps", 4, "--save-every", 2, "--eval-every", 2)
    full = tmp_path / "full"
    convert(argv(assets, full, *common))
    ref = train_losses(tmp_path / "full.work" / "distill" / "log.jsonl")
    assert sorted(ref) == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path / "full.work" / "distill" / "checkpoints")) == ["step_2", "step_4"]

    from fpmgm_hf.training.train import Trainer

    real_step = Trainer.train_step

    def crash_at_step_4(self):
        if self.step == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self)

    out = tmp_path / "crashed"
    with mock.patch.object(Trainer, "train_step", crash_at_step_4), pytest.raises(KeyboardInterrupt):
        convert(argv(assets, out, *common))
    assert not out.exists() and not list(tmp_path.glob("crashed.tmp-*"))
    assert sorted(os.listdir(tmp_path / "crashed.work" / "distill" / "checkpoints")) == ["step_2"]

    with pytest.raises(FileExistsError, match="--resume latest"):  # a fresh run would mix with the old logs
        convert(argv(assets, out, *common))
    convert(argv(assets, out, *common, "--resume", "latest"))
    log = read_log(tmp_path / "crashed.work" / "distill" / "log.jsonl")
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in log)
    assert train_losses(tmp_path / "crashed.work" / "distill" / "log.jsonl") == ref  # steps 3, 4: same loss
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_consistency_stage_early_stop_card_and_3sr(assets, tmp_path):
    out = tmp_path / "cofre"
    # --stop-ppl-rise -0.5: any PPL is above half the pre-stage value, so the first eval stops the stage.
    convert(argv(assets, out, "--steps", 2, "--eval-every", 2, "--save-every", 0, "--consistency-weight", 0.1,
                 "--consistency-warmup", 2, "--consistency-steps", 6, "--stop-ppl-rise", -0.5))
    report = json.loads((out / "conversion.json").read_text())
    stages = report["finetune"]["stages"]
    assert stages["distill"]["steps"] == 2 and not stages["distill"]["stopped_early"]
    assert stages["consistency"]["steps"] == 2 and stages["consistency"]["stopped_early"]
    log = read_log(tmp_path / "cofre.work" / "consistency" / "log.jsonl")
    assert log[0]["event"] == "pre_stage" and any(r.get("event") == "early_stop" for r in log)
    assert any("consistency" in r and "lambda" in r for r in log)
    assert reuse_mode(out) == "3sr"

    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    # A local source: named, without base_model metadata or a link; no local path anywhere in the card.
    assert front["library_name"] == "transformers" and "base_model" not in front
    assert "Converted from a local checkpoint (`mdlm`)" in text and "huggingface.co/mdlm" not in text
    assert str(tmp_path) not in text and str(assets["data"]) not in text and "| fine-tuning data | train.txt |" in text
    assert "github.com" not in text
    assert 'AutoTokenizer.from_pretrained(repo, revision="main", trust_remote_code=False)' in text
    assert {"custom_code", "masked-diffusion"} <= set(front["tags"])
    assert "| MDLM teacher |" in text and "after fine-tuning" in text
    assert f"{report['verify_after']['converted_nelbo']:.4f}" in text


def test_consistency_in_the_distillation_run(assets, tmp_path):
    out = tmp_path / "same-run"
    convert(argv(assets, out, "--steps", 2, "--eval-every", 0, "--save-every", 0, "--consistency-weight", 0.1,
                 "--consistency-warmup", 1))
    log = read_log(tmp_path / "same-run.work" / "distill" / "log.jsonl")
    steps = [r for r in log if "loss" in r]
    assert all("kl" in r and "consistency" in r for r in steps) and steps[-1]["lambda_cons"] == 0.1
    assert reuse_mode(out) == "3sr"


def test_push_to_hub_uploads_the_finished_folder(assets, tmp_path):
    out = tmp_path / "pushed"
    seen = {}

    def upload_folder(*, repo_id, folder_path, revision, commit_message):
        seen["files"] = sorted(os.listdir(folder_path))
        seen["card"] = (Path(folder_path) / "README.md").read_text()
        seen["config"] = json.loads((Path(folder_path) / "config.json").read_text())
        seen["repo"], seen["revision"] = repo_id, revision
        return mock.Mock(commit_url="https://hf.co/me/fp/commit/1")

    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api_cls.return_value.upload_folder.side_effect = upload_folder
        convert(argv(assets, out, "--dry-run", "--push-to-hub", "me/fp-mdlm", "--private", "--revision", "v1"))
    api = api_cls.return_value
    api.create_repo.assert_called_once_with(repo_id="me/fp-mdlm", private=True, exist_ok=True)
    api.create_branch.assert_called_once_with(repo_id="me/fp-mdlm", branch="v1", exist_ok=True)
    assert seen["repo"] == "me/fp-mdlm" and seen["revision"] == "v1"
    expected = {"README.md", "config.json", "model.safetensors", "generation_config.json", "modeling_fpmgm.py",
                "configuration_fpmgm.py", "tokenizer.json", "tokenizer_config.json", "conversion.json"}
    assert expected <= set(seen["files"])
    assert not any(".tmp-" in f for f in seen["files"])
    assert seen["config"]["auto_map"]["AutoModel"].startswith("modeling_fpmgm.")
    assert 'repo = "me/fp-mdlm"' in seen["card"] and "revision=\"v1\"" in seen["card"]


def test_lora_trains_adapters_and_merges(assets, tmp_path):
    out = tmp_path / "lora"
    convert(argv(assets, out, "--steps", 2, "--eval-every", 0, "--save-every", 2, "--lora-r", 2))
    report = json.loads((out / "conversion.json").read_text())
    params = report["finetune"]["parameters"]
    d, blocks = 32, 3
    lora = blocks * 2 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))  # r (in + out) per Linear, r = 2
    injection = sum(v.numel() for k, v in load_file(out / "model.safetensors").items() if ".injection." in k)
    assert params["trainable_parameters"] == lora + injection
    assert params["trainable_parameters"] < params["total_parameters"] / 5
    assert report["finetune"]["lora_alpha"] == 4

    from fpmgm_hf import FPMGMForMaskedGeneration
    from fpmgm_hf.conversion.layer_mapping import map_layers
    from fpmgm_hf.conversion.mdlm_import import load_mdlm_checkpoint

    merged = FPMGMForMaskedGeneration.from_pretrained(str(out))
    before = map_layers(load_mdlm_checkpoint(str(assets["mdlm"])), "1,2,3", 1, 1, 1, seed=0).state_dict()
    after = merged.state_dict()
    assert before.keys() == after.keys() and not any("lora" in k for k in after)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert any(".attn.attn_qkv." in k for k in changed) and any(".injection." in k for k in changed)
    assert all(any(s in k for s in (".attn.attn_", ".mlp.0.", ".mlp.2.", ".injection.")) for k in changed), changed
    assert not any("sigma_map" in k or "adaLN" in k or "embed" in k for k in changed)


def test_keep_adapter_saves_base_and_adapter_that_load_three_ways(assets, tmp_path):
    from peft import AutoPeftModel, PeftModel

    from fpmgm_hf import FPMGMForMaskedGeneration
    from fpmgm_hf.conversion.layer_mapping import map_layers
    from fpmgm_hf.conversion.mdlm_import import load_mdlm_checkpoint

    out = tmp_path / "kept"
    convert(argv(assets, out, "--steps", 2, "--eval-every", 0, "--save-every", 0, "--lora-r", 2, "--keep-adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json"} <= set(
        os.listdir(out))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(out.resolve())
    base = map_layers(load_mdlm_checkpoint(str(assets["mdlm"])), "1,2,3", 1, 1, 1, seed=0).eval()
    saved = load_file(out / "model.safetensors")  # the base weights, exactly the mapped model's
    assert all(torch.equal(saved[k], v) for k, v in base.state_dict().items() if k in saved)

    x = torch.randint(0, 30, (2, 16), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.5)
    logits = lambda m: m.eval()(x, timesteps=t).logits  # noqa: E731
    plain = logits(FPMGMForMaskedGeneration.from_pretrained(str(out)))  # transformers applies the adapter
    explicit = logits(PeftModel.from_pretrained(base, str(out)))
    auto = logits(AutoPeftModel.from_pretrained(str(out), import_allowlist=["fpmgm_hf"]))
    torch.testing.assert_close(plain, explicit)
    torch.testing.assert_close(auto, explicit)
    assert not torch.allclose(explicit, logits(map_layers(load_mdlm_checkpoint(str(assets["mdlm"])), "1,2,3", 1, 1,
                                                                  1, seed=0)))
    with pytest.raises(ValueError, match="allowlist"):  # PEFT's default allowlist does not name fpmgm_hf
        AutoPeftModel.from_pretrained(str(out))
    card = (out / "README.md").read_text()
    assert "peft" in yaml.safe_load(card.split("---")[1])["tags"] and 'import_allowlist=["fpmgm_hf"]' in card


def test_two_processes_under_torchrun(assets, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process here (no MPI); torchrun starts two."""
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "conversion" / "convert.py"),
           *map(str, argv(assets, out, "--steps", 2, "--eval-every", 2, "--save-every", 2))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "conversion.json").read_text())
    assert report["training"]["processes"] == 2
    ckpt = tmp_path / "ddp.work" / "distill" / "checkpoints" / "step_2"
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors"} <= set(os.listdir(ckpt))
    assert json.loads((ckpt / "trainer_state.json").read_text())["num_processes"] == 2


def test_map_auto_is_the_default_and_its_choice_is_published(assets, tmp_path):
    out = tmp_path / "auto"
    args = [a for a in argv(assets, out, "--dry-run") if a not in ("--map", "1,2,3")]
    convert(args)
    report = json.loads((out / "conversion.json").read_text())
    assert report["mapping_from"] == "layer CKA (--map auto)" and len(report["mapping"]) == 3
    assert (out / "cka.png").is_file() and (out / "cka.pt").is_file()
    card = (out / "README.md").read_text()
    assert ",".join(map(str, report["mapping"])) + " (chosen by --map auto from the layer CKA; see cka.png)" in card
    assert report["data"]["heldout"] == "last 0.05" and report["data"]["wrap"] in ("none", "bos_eos")
