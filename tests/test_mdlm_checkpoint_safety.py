"""The MDLM importer reads a Lightning `.ckpt` without running code from it (OmegaConf config and tokenizer objects
as inert stand-ins, any other pickled global refused by name unless trust_pickle=True), imports half-precision
checkpoints, and names the file and the entry of every bad config, non-tensor entry or non-finite weight."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from pathlib import Path

import fake_omegaconf
import pytest
import torch
from payloads import MarkerPayload
from reliability_table import expect_error, record
from test_mdlm_import import (  # noqa: F401 - _one_thread is an autouse fixture
    BLOCKS,
    COND,
    HEADS,
    HUB_CONFIG,
    H,
    _convert_module,
    _ids,
    _one_thread,
    mdlm_state_dict,
    reference_logits,
    tiny_tokenizer,
    write_hub_folder,
    write_lightning_ckpt,
)

from fpmgm_hf.conversion.mdlm_import import MDLMCheckpointError, load_mdlm_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mdlm_safety")
    raw, ema = mdlm_state_dict(0), mdlm_state_dict(1)
    return {"raw": raw, "ema": ema, "hub": write_hub_folder(root / "hub", raw),
            "ckpt": write_lightning_ckpt(root / "last.ckpt", raw, ema)}


class FakeDictConfig:
    """A pickled custom class in the hyper-parameters: not on the allow-list."""

    def __init__(self, data):
        self._data = data

    def items(self):
        return self._data.items()


def _with_hparams(path: Path, ckpts, hparams) -> Path:
    write_lightning_ckpt(path, ckpts["raw"], ckpts["ema"], hparams=False)
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"] = hparams
    torch.save(ckpt, path)
    return path


TINY_HPARAMS = {"model": {"hidden_size": H, "n_heads": HEADS, "n_blocks": BLOCKS, "cond_dim": COND, "length": 48,
                          "dropout": 0.0, "name": "tiny"}, "time_conditioning": False, "seed": 1}


def test_unknown_pickled_global_is_refused_unless_trusted(ckpts, tmp_path):
    path = _with_hparams(tmp_path / "custom.ckpt", ckpts, {"config": FakeDictConfig({
        "model": FakeDictConfig(TINY_HPARAMS["model"]), "time_conditioning": False})})
    expect_error("importer", "Lightning .ckpt whose hyper-parameters pickle an unknown class",
                 lambda: load_mdlm_checkpoint(path, ema=False), MDLMCheckpointError,
                 r"custom\.ckpt refers to .*test_mdlm_checkpoint_safety\.FakeDictConfig.*trust_pickle=True")
    with pytest.warns(UserWarning, match="trust_pickle=True"):
        model = load_mdlm_checkpoint(path, ema=False, trust_pickle=True)
    assert (model.config.max_position_embeddings, model.config.dropout) == (48, 0.0)
    ids = _ids(7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, return_dict=True).logits, reference_logits(ckpts["raw"], ids),
                                   atol=1e-4, rtol=1e-4)


def test_lightning_omegaconf_config_and_tokenizer_load_without_unpickling(ckpts, tmp_path, monkeypatch):
    """MDLM's save_hyperparameters() keeps an OmegaConf config and the tokenizer object: both are read as inert
    stand-ins (no warning, no trust needed) and the config is used."""
    tok = tiny_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer

    with monkeypatch.context() as m:
        config = fake_omegaconf.build(TINY_HPARAMS, fake_omegaconf.install(m))
        path = _with_hparams(tmp_path / "omega.ckpt", ckpts, {"config": config,
                                                               "tokenizer": AutoTokenizer.from_pretrained(tok)})
    assert "omegaconf.dictconfig.DictConfig" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_mdlm_checkpoint(path)
    assert (model.config.max_position_embeddings, model.config.dropout) == (48, 0.0)
    record("importer", "Lightning .ckpt with an OmegaConf config and a tokenizer object in hyper_parameters",
           "imports; the config is read from inert stand-ins, no code runs")


def test_planted_pickle_payload_never_runs(ckpts, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = _with_hparams(tmp_path / "evil.ckpt", ckpts, {"config": {}, "note": MarkerPayload(marker)})
    expect_error("security", "Lightning .ckpt with a payload in hyper_parameters (load_mdlm_checkpoint)",
                 lambda: load_mdlm_checkpoint(path), MDLMCheckpointError, r"evil\.ckpt refers to .*mkdir")
    assert not marker.exists()
    convert = _convert_module()
    expect_error("security", "the same .ckpt given to conversion/convert.py --dry-run",
                 lambda: convert.main(["--mdlm", str(path), "--output", str(tmp_path / "out"), "--dry-run"]),
                 MDLMCheckpointError, r"--trust-pickle|trust_pickle")
    assert not marker.exists() and not (tmp_path / "out").exists()
    with pytest.warns(UserWarning):  # the explicit opt-in does run it: the payload is real
        load_mdlm_checkpoint(path, trust_pickle=True)
    assert marker.is_dir()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_import(ckpts, tmp_path, dtype):
    half = OrderedDict((k, v.to(dtype)) for k, v in ckpts["raw"].items())
    model = load_mdlm_checkpoint(write_hub_folder(tmp_path / "half", half))
    ids = _ids(3)
    with torch.no_grad():
        got = model(ids, return_dict=True).logits
    want = reference_logits(OrderedDict((k, v.float()) for k, v in half.items()), ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    record("importer", f"{str(dtype).split('.')[-1]} MDLM checkpoint (inv_freq rounded to {dtype})",
           "imports; logits equal the fp32 reference of the same weights")


def _bad_entry_cases(ckpts, tmp_path):
    sd = OrderedDict(ckpts["raw"])
    nan = OrderedDict(sd, **{"backbone.blocks.1.mlp.0.bias": sd["backbone.blocks.1.mlp.0.bias"].clone()})
    nan["backbone.blocks.1.mlp.0.bias"][3] = float("nan")
    bad_json = write_hub_folder(tmp_path / "json", sd)
    (bad_json / "config.json").write_text('{"hidden_dim": 32,')
    not_object = write_hub_folder(tmp_path / "list", sd)
    (not_object / "config.json").write_text("[1, 2]")
    wrong_type = write_hub_folder(tmp_path / "type", sd)
    (wrong_type / "config.json").write_text(json.dumps(dict(HUB_CONFIG, n_heads="four")))
    ckpt = torch.load(ckpts["ckpt"], weights_only=True)
    entry = tmp_path / "entry.ckpt"
    torch.save(dict(ckpt, state_dict=dict(ckpt["state_dict"], **{"backbone.blocks.0.norm1.weight": "text"})), entry)
    shadow = tmp_path / "shadow.ckpt"
    torch.save(dict(ckpt, ema=dict(ckpt["ema"], shadow_params=ckpt["ema"]["shadow_params"][:-1] + [3.0])), shadow)
    inf = tmp_path / "inf.ckpt"
    ema = [t.clone() for t in ckpt["ema"]["shadow_params"]]
    ema[0][0, 0] = float("inf")
    torch.save(dict(ckpt, ema=dict(ckpt["ema"], shadow_params=ema)), inf)
    return [
        ("config.json that is not valid JSON", bad_json, r"json/config\.json"),
        ("config.json holding a JSON list", not_object, r"list/config\.json holds a JSON list"),
        ("config.json with a field of the wrong type", wrong_type, r"type.*num_attention_heads.*'four'"),
        ("non-tensor entry in state_dict", entry, r"entry\.ckpt: `state_dict` entry `backbone\.blocks\.0\.norm1"),
        ("non-tensor entry in the EMA shadow list", shadow,
         r"shadow\.ckpt: `ema\.shadow_params` entry `39` is a float"),
        ("NaN in a weight (safetensors)", write_hub_folder(tmp_path / "nan", nan),
         r"nan/model\.safetensors: tensor `backbone\.blocks\.1\.mlp\.0\.bias` holds 1 non-finite"),
        ("inf in an EMA weight (.ckpt)", inf, r"inf\.ckpt: tensor `0` holds 1 non-finite"),
    ]


def test_every_bad_file_or_entry_gets_a_named_error(ckpts, tmp_path):
    for case, path, match in _bad_entry_cases(ckpts, tmp_path):
        expect_error("importer", case, lambda p=path: load_mdlm_checkpoint(p), MDLMCheckpointError, match)


def test_config_reader_is_bounded_on_shared_cyclic_and_deep_hyper_parameters():
    import time

    from fpmgm_hf.conversion.checkpoint_pickle import MAX_CONFIG_DEPTH, to_plain

    shared = [1]
    for _ in range(40):  # 2^40 items if expanded naively
        shared = [shared, shared]
    t0 = time.perf_counter()
    to_plain({"model": shared})
    assert time.perf_counter() - t0 < 1.0
    cycle = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="refers to itself"):
        to_plain({"model": cycle})
    deep = 1
    for _ in range(MAX_CONFIG_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValueError, match="deeper than"):
        to_plain(deep)
    assert to_plain({"model": {"hidden_size": 768, "pairs": [[1, 2], (3, 4)]}}) == {
        "model": {"hidden_size": 768, "pairs": [[1, 2], [3, 4]]}}
