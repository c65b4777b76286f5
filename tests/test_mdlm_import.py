"""MDLM checkpoint import, layer mapping and the conversion script.

Tiny MDLM checkpoints (hidden 32, 4 heads of dim 8, 3 blocks, cond 16, vocab 40) are written in both
upstream formats with the exact upstream key layout, and the imported model is checked against an
independent reference forward written here from the architecture description (it does not use any
fpmgm_hf modeling code).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from remote_helpers import run_isolated
from safetensors.torch import save_file

from fpmgm_hf.conversion.layer_mapping import linear_cka_matrix, map_layers, pick_mapping_from_cka, save_cka_png
from fpmgm_hf.conversion.mdlm_import import (
    MDLMCheckpointError,
    convert_mdlm_state_dict,
    load_mdlm_checkpoint,
    mdlm_config_to_fpmgm,
    mdlm_parameter_names,
)

H, HEADS, BLOCKS, COND, VOCAB, LENGTH = 32, 4, 3, 16, 40, 64
HEAD_DIM = H // HEADS
REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ tiny checkpoints


def mdlm_state_dict(seed: int) -> "OrderedDict[str, torch.Tensor]":
    """Random weights with MDLM's exact state_dict layout and order (`backbone.*`, incl. inv_freq)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, base=0.0, std=0.2):
        return base + torch.randn(*shape, generator=g) * std

    sd = OrderedDict()
    sd["backbone.vocab_embed.embedding"] = rnd(VOCAB, H, std=1.0)
    sd["backbone.sigma_map.mlp.0.weight"] = rnd(COND, 256)
    sd["backbone.sigma_map.mlp.0.bias"] = rnd(COND)
    sd["backbone.sigma_map.mlp.2.weight"] = rnd(COND, COND)
    sd["backbone.sigma_map.mlp.2.bias"] = rnd(COND)
    sd["backbone.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    for i in range(BLOCKS):
        p = f"backbone.blocks.{i}."
        sd[p + "norm1.weight"] = rnd(H, base=1.0, std=0.1)
        sd[p + "attn_qkv.weight"] = rnd(3 * H, H)
        sd[p + "attn_out.weight"] = rnd(H, H)
        sd[p + "norm2.weight"] = rnd(H, base=1.0, std=0.1)
        sd[p + "mlp.0.weight"] = rnd(4 * H, H)
        sd[p + "mlp.0.bias"] = rnd(4 * H)
        sd[p + "mlp.2.weight"] = rnd(H, 4 * H)
        sd[p + "mlp.2.bias"] = rnd(H)
        sd[p + "adaLN_modulation.weight"] = rnd(6 * H, COND)
        sd[p + "adaLN_modulation.bias"] = rnd(6 * H)
    sd["backbone.output_layer.norm_final.weight"] = rnd(H, base=1.0, std=0.1)
    sd["backbone.output_layer.linear.weight"] = rnd(VOCAB, H)
    sd["backbone.output_layer.linear.bias"] = rnd(VOCAB)
    sd["backbone.output_layer.adaLN_modulation.weight"] = rnd(2 * H, COND)
    sd["backbone.output_layer.adaLN_modulation.bias"] = rnd(2 * H)
    return sd


HUB_CONFIG = {
    "_name_or_path": "tiny/mdlm", "architectures": ["MDLM"],
    "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
    "cond_dim": COND, "dropout": 0.1, "hidden_dim": H, "model_length": LENGTH, "model_type": "mdlm",
    "n_blocks": BLOCKS, "n_heads": HEADS, "return_dict": False, "time_conditioning": False,
    "torch_dtype": "float32", "transformers_version": "4.38.2", "vocab_size": VOCAB,
}


def write_hub_folder(folder: Path, sd) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(HUB_CONFIG))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def write_lightning_ckpt(path: Path, sd, ema_sd, hparams: bool = True) -> Path:
    ckpt = {
        "epoch": 0, "global_step": 10, "state_dict": sd,
        "ema": {"decay": 0.9999, "num_updates": 10,
                "shadow_params": [ema_sd[name] for name in mdlm_parameter_names(BLOCKS)]},
    }
    if hparams:
        ckpt["hyper_parameters"] = {"config": {
            "model": {"name": "tiny", "type": "ddit", "hidden_size": H, "cond_dim": COND, "length": LENGTH,
                      "n_blocks": BLOCKS, "n_heads": HEADS, "scale_by_sigma": True, "dropout": 0.1},
            "time_conditioning": False, "parameterization": "subs",
        }}
    torch.save(ckpt, str(path))
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls are far faster single-threaded on a shared CPU; restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mdlm")
    raw, ema = mdlm_state_dict(0), mdlm_state_dict(1)
    return {
        "raw": raw, "ema": ema,
        "hub": write_hub_folder(root / "hub", raw),
        "ckpt": write_lightning_ckpt(root / "last.ckpt", raw, ema),
        "bare_ckpt": write_lightning_ckpt(root / "bare.ckpt", raw, ema, hparams=False),
    }


@pytest.fixture(scope="module")
def teacher(ckpts):
    return load_mdlm_checkpoint(ckpts["hub"])


# ------------------------------------------------------------------- independent reference forward


def reference_logits(sd, ids: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """MDLM's DiT forward in fp32, from the architecture description only."""
    w = {k[len("backbone."):]: v.float() for k, v in sd.items()}
    B, L = ids.shape
    D = w["vocab_embed.embedding"].shape[1]
    hd = D // heads

    def linear(x, name, bias=True):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if bias else y

    def norm(x, name):  # LayerNorm without bias, eps 1e-5
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w[name]

    # conditioning at sigma = 0: sinusoidal features [cos | sin] of width 256 are [1]*128 + [0]*128
    feats = torch.cat([torch.ones(B, 128), torch.zeros(B, 128)], dim=-1)
    c = F.silu(linear(F.silu(linear(feats, "sigma_map.mlp.0")), "sigma_map.mlp.2"))  # (B, C)

    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(L).float()[:, None] * inv[None]  # (L, hd/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # (L, hd), non-interleaved

    def rope(x):  # x (B, L, heads, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * cos[None, :, None] + rotated * sin[None, :, None]

    x = w["vocab_embed.embedding"][ids]
    n_blocks = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(n_blocks):
        p = f"blocks.{i}."
        mod = linear(c, p + "adaLN_modulation")[:, None]  # (B, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[..., k * D:(k + 1) * D] for k in range(6))
        h = norm(x, p + "norm1.weight") * (1 + scale1) + shift1
        qkv = (h @ w[p + "attn_qkv.weight"].T).view(B, L, 3, heads, hd)
        q, k, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        att = att.transpose(1, 2).reshape(B, L, D) @ w[p + "attn_out.weight"].T
        x = x + gate1 * att
        h = norm(x, p + "norm2.weight") * (1 + scale2) + shift2
        m = linear(F.gelu(linear(h, p + "mlp.0"), approximate="tanh"), p + "mlp.2")
        x = x + gate2 * m
    shift, scale = linear(c, "output_layer.adaLN_modulation")[:, None].chunk(2, dim=-1)
    h = norm(x, "output_layer.norm_final.weight") * (1 + scale) + shift
    return linear(h, "output_layer.linear")


def _ids(seed=0, batch=2, length=12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- loading


def test_hub_folder_matches_reference(ckpts):
    model = load_mdlm_checkpoint(ckpts["hub"])
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_pre_layers, cfg.num_fp_layers, cfg.num_post_layers) == (
        H, HEADS, BLOCKS, 0, 0)
    assert (cfg.cond_dim, cfg.vocab_size, cfg.mask_token_id) == (COND, VOCAB, VOCAB - 1)
    assert cfg.max_position_embeddings == LENGTH
    assert not model.training and cfg.time_conditioning is False
    ids = _ids()
    with torch.no_grad():
        got = model(ids, return_dict=True).logits
    torch.testing.assert_close(got, reference_logits(ckpts["raw"], ids), atol=1e-4, rtol=1e-4)


def test_lightning_ckpt_uses_ema_by_default(ckpts):
    ids = _ids(1)
    with torch.no_grad():
        ema = load_mdlm_checkpoint(ckpts["ckpt"])(ids, return_dict=True).logits
        raw = load_mdlm_checkpoint(ckpts["ckpt"], ema=False)(ids, return_dict=True).logits
    torch.testing.assert_close(ema, reference_logits(ckpts["ema"], ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(raw, reference_logits(ckpts["raw"], ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ema, raw, atol=1e-2)


def test_single_safetensors_file_reads_the_sibling_config(ckpts):
    model = load_mdlm_checkpoint(ckpts["hub"] / "model.safetensors")
    assert model.config.max_position_embeddings == LENGTH


def test_ckpt_without_hyper_parameters_configured_from_shapes_and_overrides(ckpts):
    model = load_mdlm_checkpoint(ckpts["bare_ckpt"], max_position_embeddings=LENGTH, dropout=0.0)
    assert (model.config.num_attention_heads, model.config.cond_dim, model.config.dropout) == (HEADS, COND, 0.0)
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, return_dict=True).logits, reference_logits(ckpts["ema"], ids),
                                   atol=1e-4, rtol=1e-4)


def test_key_map_covers_full_size_mdlm_owt():
    """All 131 tensors of kuleshov-group/mdlm-owt map one-to-one onto our 130 parameters (meta tensors)."""
    from fpmgm_hf import FPMGMForMaskedGeneration

    config = mdlm_config_to_fpmgm({"hidden_dim": 768, "n_heads": 12, "n_blocks": 12, "cond_dim": 128,
                                   "vocab_size": 50258, "model_length": 1024, "dropout": 0.1,
                                   "time_conditioning": False})
    assert config.mask_token_id == 50257 and config.cond_dim == 128
    with torch.device("meta"):
        model = FPMGMForMaskedGeneration(config)
    own = model.state_dict()
    sd = {}
    for name in mdlm_parameter_names(12):
        target = name.replace("backbone.vocab_embed.embedding", "model.embed_tokens.weight")
        target = target.replace("backbone.sigma_map", "model.conditioning.sigma_map")
        target = target.replace("backbone.output_layer", "lm_head")
        target = target.replace("backbone.blocks", "model.pre_blocks").replace("attn_qkv", "attn.attn_qkv")
        target = target.replace("attn_out", "attn.attn_out")
        sd[name] = torch.empty(own[target].shape, device="meta")
    sd["backbone.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    assert len(sd) == 131
    mapped = convert_mdlm_state_dict(sd, head_dim=64)
    assert len(mapped) == 130 and set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert sum(v.numel() for v in mapped.values()) == 169_627_218


# ------------------------------------------------------------------------------------------ bad inputs


def test_bad_checkpoints_list_problems(ckpts, tmp_path):
    sd = OrderedDict(ckpts["raw"])
    del sd["backbone.blocks.1.norm2.weight"]
    sd["backbone.blocks.0.attn_out.weight"] = torch.zeros(H, H + 1)
    sd["backbone.extra.weight"] = torch.zeros(3)
    with pytest.raises(MDLMCheckpointError) as err:
        load_mdlm_checkpoint(write_hub_folder(tmp_path / "bad", sd))
    msg = str(err.value)
    assert "missing keys" in msg and "model.pre_blocks.1.norm2.weight" in msg
    assert "unexpected keys" in msg and "backbone.extra.weight" in msg
    assert "shape mismatches" in msg and "model.pre_blocks.0.attn.attn_out.weight" in msg
    with pytest.raises(MDLMCheckpointError, match="unexpected keys"):
        convert_mdlm_state_dict(sd)


def test_rotary_buffer_mismatch_is_reported(ckpts, tmp_path):
    sd = OrderedDict(ckpts["raw"])
    sd["backbone.rotary_emb.inv_freq"] = 1.0 / 500 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    with pytest.raises(MDLMCheckpointError, match="rotary mismatch"):
        load_mdlm_checkpoint(write_hub_folder(tmp_path / "rot", sd))


def test_missing_path_and_unreachable_repo(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mdlm_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        load_mdlm_checkpoint(str(tmp_path / "nope.ckpt"))

    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MDLMCheckpointError, match="no-such-org/no-such-mdlm.*Hub"):
        load_mdlm_checkpoint("no-such-org/no-such-mdlm")


def test_truncated_files_name_the_file(ckpts, tmp_path):
    folder = write_hub_folder(tmp_path / "trunc", ckpts["raw"])
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MDLMCheckpointError, match=r"model\.safetensors"):
        load_mdlm_checkpoint(folder)
    bad = tmp_path / "trunc.ckpt"
    bad.write_bytes(Path(ckpts["ckpt"]).read_bytes()[:1000])
    with pytest.raises(MDLMCheckpointError, match=r"trunc\.ckpt"):
        load_mdlm_checkpoint(bad)


# ------------------------------------------------------------------------------------------ mapping


@pytest.mark.parametrize("mapping", ["1,2,3", (3, 1, 2)])
def test_mapping_one_iteration_equals_chosen_layers(teacher, ckpts, mapping):
    student = map_layers(teacher, mapping, num_pre=1, num_fp=1, num_post=1).eval()
    layers = [int(i) for i in mapping.split(",")] if isinstance(mapping, str) else list(mapping)
    # the explicit stack of the chosen layers, through the independent reference forward
    stacked = OrderedDict((k, v) for k, v in ckpts["raw"].items() if ".blocks." not in k)
    for new_index, layer in enumerate(layers):
        prefix = f"backbone.blocks.{layer - 1}."
        for key, value in ckpts["raw"].items():
            if key.startswith(prefix):
                stacked[f"backbone.blocks.{new_index}.{key[len(prefix):]}"] = value
    ids = _ids(3)
    expected = reference_logits(stacked, ids)
    with torch.no_grad():  # the default constrained injection: exactly the chosen layers at one iteration
        exact = student(ids, fp_iters=1, fp_tol=0, return_dict=True)
    assert int(exact.block_passes[0]) == 3
    torch.testing.assert_close(exact.logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    paper = map_layers(teacher, mapping, num_pre=1, num_fp=1, num_post=1, injection="concat_mlp").eval()
    with torch.no_grad():
        approx = paper(ids, fp_iters=1, fp_tol=0, return_dict=True).logits
        assert (approx - expected).abs().max() < 0.1  # only the small random G columns differ
        paper.model.injection.fc1.weight[:, H:] = 0.0  # drop G(h_pre): the injection is exactly z
        torch.testing.assert_close(paper(ids, fp_iters=1, fp_tol=0).logits, expected, atol=1e-4, rtol=1e-4)


def test_bad_mappings_name_the_flag(teacher):
    with pytest.raises(ValueError, match=r"--map.*\[1, 3\].*out of range: \[4\]"):
        map_layers(teacher, "1,2,4")
    with pytest.raises(ValueError, match=r"--map expects 3 .*\[1, 3\]"):
        map_layers(teacher, "1,2")
    with pytest.raises(ValueError, match="--map"):
        map_layers(teacher, "1,x,3")


def test_cka_matrix_and_auto_mapping(teacher, tmp_path):
    cka = linear_cka_matrix(teacher, _ids(4, batch=2, length=16))
    assert cka.shape == (BLOCKS, BLOCKS)
    torch.testing.assert_close(cka, cka.T)
    assert torch.allclose(cka.diagonal(), torch.ones(BLOCKS, dtype=cka.dtype))
    assert ((cka >= -1e-9) & (cka <= 1 + 1e-9)).all()
    assert len(pick_mapping_from_cka(cka, 1, 1, 1)) == 3

    # The paper's structure: layers 1-5 early, 6-12 self-similar, lowest consecutive CKA between 5 and 6.
    synth = torch.full((12, 12), 0.06, dtype=torch.float64)
    synth[:5, :5], synth[5:, 5:] = 0.8, 0.998
    synth.fill_diagonal_(1.0)
    synth[4, 5] = synth[5, 4] = 0.162
    assert pick_mapping_from_cka(synth, 1, 1, 1) == [1, 6, 12]
    assert pick_mapping_from_cka(synth, 2, 2, 1) == [1, 2, 6, 7, 12]
    with pytest.raises(ValueError):
        pick_mapping_from_cka(synth, 6, 6, 6)
    if importlib.util.find_spec("matplotlib") is not None:
        assert save_cka_png(cka, tmp_path / "cka.png") and (tmp_path / "cka.png").stat().st_size > 0


# ----------------------------------------------------------------------------------- conversion script


def tiny_tokenizer(folder: Path, size: int = VOCAB) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "it", "was", "very",
             "good", "day", "for", "all", "of", "us", "to", "see", "in", "sun", "we", "go", "home", "now",
             "then", "so", "is", ".", ",", "he", "she", "said", "that", "city", "had", "people"]
    vocab = {"[UNK]": 0, "<|endoftext|>": 1}
    for word in words[: size - 3]:
        vocab[word] = len(vocab)
    vocab["[MASK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", mask_token="[MASK]",
                                   eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert len(fast) == size
    fast.save_pretrained(str(folder))
    return folder


def _convert_module():
    spec = importlib.util.spec_from_file_location("fpmgm_convert_script", REPO / "conversion" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_LOADER = """
import json, sys
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained({folder!r}, trust_remote_code=True, dtype=torch.float32).eval()
assert "fpmgm_hf" not in type(model).__module__, type(model).__module__
assert not any(m == "fpmgm_hf" or m.startswith("fpmgm_hf.") for m in sys.modules)
ids = torch.load({ids!r})
with torch.no_grad():
    torch.save(model(ids, return_dict=True).logits, {logits!r})
print(json.dumps({{"module": type(model).__module__}}))
"""


def test_dry_run_folder_loads_as_remote_code_without_fpmgm_hf(ckpts, tmp_path):
    convert = _convert_module()
    tok = tiny_tokenizer(tmp_path / "tok")
    out = tmp_path / "fp-mdlm"
    convert.main(["--mdlm", str(ckpts["ckpt"]), "--map", "1,2,3", "--layers", "1/1/1", "--output", str(out),
                  "--dry-run", "--tokenizer", str(tok), "--verify-batch", "2", "--verify-length", "16",
                  "--sample-length", "8", "--sample-steps", "4"])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_fpmgm.py", "configuration_fpmgm.py",
            "generation_config.json", "tokenizer.json", "conversion.json"} <= names
    assert not list(tmp_path.glob("fp-mdlm.tmp-*"))
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].startswith("modeling_fpmgm.")
    assert (config["num_pre_layers"], config["num_fp_layers"], config["num_post_layers"]) == (1, 1, 1)
    report = json.loads((out / "conversion.json").read_text())
    assert report["mapping"] == [1, 2, 3] and report["ema"] is True

    from fpmgm_hf import FPMGMForMaskedGeneration

    local = FPMGMForMaskedGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    teacher = load_mdlm_checkpoint(ckpts["ckpt"])
    torch.testing.assert_close(local.model.fp_blocks[0].mlp[0].weight, teacher.model.pre_blocks[1].mlp[0].weight)
    ids = _ids(5)
    with torch.no_grad():
        expected = local(ids, return_dict=True).logits
    torch.save(ids, tmp_path / "ids.pt")
    result = run_isolated(_LOADER.format(folder=str(out), ids=str(tmp_path / "ids.pt"),
                                         logits=str(tmp_path / "logits.pt")), tmp_path, timeout=120)
    assert "transformers_modules" in result["module"]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)

    # An existing output is refused unless --overwrite.
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.main(["--mdlm", str(ckpts["ckpt"]), "--map", "1,2,3", "--output", str(out), "--dry-run",
                      "--tokenizer", str(tok)])


def test_convert_rejects_vocab_mismatch_and_bad_map(ckpts, tmp_path):
    convert = _convert_module()
    small = tiny_tokenizer(tmp_path / "tok", size=VOCAB - 1)
    with pytest.raises(ValueError, match="vocab mismatch.*39 tokens.*40"):
        convert.main(["--mdlm", str(ckpts["hub"]), "--output", str(tmp_path / "o1"), "--dry-run",
                      "--map", "1,2,3", "--tokenizer", str(small)])
    tok = tiny_tokenizer(tmp_path / "tok2")
    with pytest.raises(ValueError, match=r"--map.*\[1, 3\]"):
        convert.main(["--mdlm", str(ckpts["hub"]), "--output", str(tmp_path / "o2"), "--dry-run",
                      "--map", "1,6,12", "--tokenizer", str(tok)])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()



# -------------------------------------------------------------------------------------- fine-tuning


def test_distill_loss_kl_and_gradients(teacher):
    from fpmgm_hf.conversion.distill import distill_loss, kl_weight_at, tempered_subs_kl

    x0 = _ids(6, batch=4, length=16).clamp_max(VOCAB - 2)
    logits = torch.randn(4, 16, VOCAB)
    z = torch.full_like(x0, VOCAB - 1)
    kl_self = tempered_subs_kl(logits, logits, z, x0, VOCAB - 1, tau=1.5)
    assert kl_self.abs().max() < 1e-5
    assert (tempered_subs_kl(logits, torch.randn(4, 16, VOCAB), z, x0, VOCAB - 1, 1.5) > 0).all()
    # a token visible to the teacher is carried over: KL = -log p_student^tau(x0)
    z_c = x0.clone()
    kl_vis = tempered_subs_kl(logits, logits, z_c, x0, VOCAB - 1, tau=1.0)
    masked_logits = logits.clone()
    masked_logits[..., VOCAB - 1] = -1e9
    nll = -torch.log_softmax(masked_logits, -1).gather(-1, x0[..., None]).squeeze(-1)
    torch.testing.assert_close(kl_vis, nll, atol=1e-4, rtol=1e-4)
    assert kl_weight_at(0) == 0.0 and kl_weight_at(2500) == pytest.approx(0.05) and kl_weight_at(10**6) == 0.1

    # the row-selected loss equals the dense (B, L) formulas (eval mode: a deterministic student)
    from fpmgm_hf.conversion.distill import _nll_per_token, nested_masks

    student = map_layers(teacher, "1,3,3").eval()
    _, aux = distill_loss(student, teacher, x0, generator=torch.Generator().manual_seed(1), kl_weight=0.1)
    z_s, z_c, t_s, _, s_mask, t_mask = nested_masks(x0, VOCAB - 1, generator=torch.Generator().manual_seed(1))
    assert (t_mask <= s_mask).all() and (t_mask.sum(1) < s_mask.sum(1)).all()
    with torch.no_grad():
        s_logits, t_logits = student(z_s, return_dict=True).logits, teacher(z_c, return_dict=True).logits
    dense_nelbo = (_nll_per_token(s_logits, z_s, x0, VOCAB - 1) / t_s[:, None]).mean()
    dense_kl = tempered_subs_kl(t_logits, s_logits, z_c, x0, VOCAB - 1, 1.5)[s_mask].mean()
    torch.testing.assert_close(aux["nelbo"], dense_nelbo)
    torch.testing.assert_close(aux["kl"], dense_kl)

    student = map_layers(teacher, "1,2,3").train()
    teacher.requires_grad_(False)
    loss, aux = distill_loss(student, teacher, x0, generator=torch.Generator().manual_seed(0), kl_weight=0.1)
    loss.backward()
    assert torch.isfinite(loss) and float(aux["kl"]) >= 0 and (aux["t_c"] < aux["t_s"]).all()
    assert student.model.fp_blocks[0].attn.attn_qkv.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    teacher.requires_grad_(True)


def test_distill_hidden_term_matches_the_teachers_stream_entering_the_post_layer(teacher):
    from fpmgm_hf.conversion.distill import distill_loss, nested_masks
    from fpmgm_hf.modeling_fpmgm import rotary_tables
    from fpmgm_hf.scheduling_fpmgm import loglinear_sigma
    from fpmgm_hf.training.objectives import hidden_consistency

    x0 = _ids(7, batch=3, length=16).clamp_max(VOCAB - 2)
    student = map_layers(teacher, "1,2,3").eval()
    with pytest.raises(ValueError, match="hidden_layer"):
        distill_loss(student, teacher, x0, generator=torch.Generator().manual_seed(2), hidden_weight=1.0)
    _, aux = distill_loss(student, teacher, x0, generator=torch.Generator().manual_seed(2), hidden_weight=1.0,
                          hidden_layer=3)
    # Reference: run the teacher's first two layers by hand on the teacher canvas, the student on its own.
    z_s, z_c, t_s, t_c, _, _ = nested_masks(x0, VOCAB - 1, generator=torch.Generator().manual_seed(2))
    inner = teacher.model
    with torch.no_grad():
        c = inner.conditioning(3, x0.device, loglinear_sigma(t_c, 1e-3), None)
        rope = rotary_tables(torch.arange(16)[:, None], teacher.config.head_dim)
        h = inner.embed_tokens(z_c)
        for block in list(inner.pre_blocks)[:2]:
            h = block(h, c, rope, None)
        z_star = student(z_s, timesteps=loglinear_sigma(t_s, 1e-3), return_dict=True).fixed_point
    expected = hidden_consistency(z_star, h, torch.ones_like(x0, dtype=torch.bool))
    torch.testing.assert_close(aux["hidden"], expected)
    assert float(aux["hidden"]) > 0
    student.train()
    loss, _ = distill_loss(student, teacher, x0, generator=torch.Generator().manual_seed(2), hidden_weight=1.0,
                           hidden_layer=3)
    loss.backward()
    assert student.model.fp_blocks[0].attn.attn_qkv.weight.grad is not None


def test_convert_with_short_finetuning(ckpts, tmp_path):
    convert = _convert_module()
    tok = tiny_tokenizer(tmp_path / "tok")
    data = tmp_path / "train.txt"
    data.write_text("\n".join(["the cat sat on the mat and the dog ran far away ."] * 60))
    out = tmp_path / "tuned"
    convert.main(["--mdlm", str(ckpts["hub"]), "--map", "auto", "--output", str(out), "--tokenizer", str(tok),
                  "--data", str(data), "--seq-len", "16", "--steps", "3", "--batch-size", "2", "--kl-warmup", "2",
                  "--verify-batch", "2", "--sample-length", "8", "--sample-steps", "2", "--log-every", "1"])
    report = json.loads((out / "conversion.json").read_text())
    assert report["training"]["steps"] == 3 and "verify_after" in report
    assert len(report["mapping"]) == 3 and (out / "cka.pt").is_file()
    assert math.isfinite(report["verify_after"]["converted_nelbo"])


def test_own_explicit_stack_folder_is_a_teacher(tmp_path):
    from conftest import tiny_model

    teacher = tiny_model(num_pre_layers=3, num_fp_layers=0, num_post_layers=0)
    teacher.save_pretrained(tmp_path / "mdlm")
    loaded = load_mdlm_checkpoint(tmp_path / "mdlm")
    x = torch.randint(0, 39, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, teacher(x).logits)
    tiny_model().save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match="explicit stack"):
        load_mdlm_checkpoint(tmp_path / "fp")
