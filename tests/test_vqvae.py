"""VQ-VAE image tokenizer: shapes, ranges, validation, save/load, remote code, CLI and a short training."""

import json

import numpy as np
import pytest
import torch
from remote_helpers import run_isolated

from fpmgm_hf.data.assets import load_image_dataset
from fpmgm_hf.images.vq import VQVAEConfig, VQVAEModel, evaluate_reconstruction, main, train_vqvae

TINY = dict(hidden_channels=8, codebook_size=32, code_dim=4)


def tiny_vq(seed: int = 0, **overrides) -> VQVAEModel:
    torch.manual_seed(seed)
    model = VQVAEModel(VQVAEConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # codebook on encoder outputs, so that several codes are in use
        model.quantizer.init_from(model.encode_latents(images(8, seed=99)), torch.Generator().manual_seed(seed))
    return model.eval()


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_losses_and_code_range():
    model = tiny_vq()
    out = model(images(4))
    assert out.reconstruction.shape == (4, 1, 28, 28)
    assert 0 <= out.reconstruction.min() and out.reconstruction.max() <= 1
    assert out.codes.shape == (4, 49) and out.codes.dtype == torch.long
    assert 0 <= out.codes.min() and out.codes.max() < 32
    for name in ("loss", "recon_loss", "commitment_loss", "perplexity"):
        assert getattr(out, name).dim() == 0 and torch.isfinite(getattr(out, name)), name
    assert torch.allclose(out.loss, out.recon_loss + 0.25 * out.commitment_loss)
    assert 1 <= out.perplexity <= 32
    out.loss.backward()  # straight-through: the encoder gets gradients
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_encode_decode_shapes_and_input_formats():
    model = tiny_vq()
    x = images(2)
    ids = model.encode(x)
    assert ids.shape == (2, 49) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < model.config.codebook_size
    # uint8 (B,H,W), uint8 (B,1,H,W), float (B,1,H,W) and numpy all give the same tokens
    assert torch.equal(model.encode(x.unsqueeze(1)), ids)
    assert torch.equal(model.encode(x.unsqueeze(1).float() / 255), ids)
    assert torch.equal(model.encode(x.numpy()), ids)
    recon = model.decode(ids)
    assert recon.shape == (2, 1, 28, 28) and recon.dtype == torch.float32
    assert 0 <= recon.min() and recon.max() <= 1
    assert torch.equal(model.decode(ids.view(2, 7, 7)), recon)
    # forward's reconstruction is exactly decode(encode(x)) in eval mode
    assert torch.allclose(model(x).reconstruction, recon)
    assert torch.equal(model(x).codes, ids)


def test_eval_forward_does_not_touch_codebook_but_training_does():
    model = tiny_vq()
    before = model.quantizer.codebook.clone()
    model(images(2))
    assert torch.equal(model.quantizer.codebook, before)
    model.train()(images(2))
    assert not torch.equal(model.quantizer.codebook, before)


def test_bad_inputs_raise_value_error():
    model = tiny_vq()
    with pytest.raises(ValueError, match=r"`images`.*28x28.*\(2, 32, 32\)"):
        model.encode(torch.zeros(2, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"`images`.*\(2, 3, 28, 28\)"):
        model.encode(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"`pixel_values`"):
        model(torch.zeros(2, 28, 27))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(torch.full((1, 28, 28), 2.0))
    with pytest.raises(ValueError, match=r"dtype"):
        model.encode(torch.zeros(1, 28, 28, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"`ids` must lie in \[0, 32\)"):
        model.decode(torch.full((1, 49), 32))
    with pytest.raises(ValueError, match=r"`ids` must lie in \[0, 32\)"):
        model.decode(torch.full((1, 49), -1))
    with pytest.raises(ValueError, match=r"`ids` must have shape \(B, 49\)"):
        model.decode(torch.zeros(1, 48, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer"):
        model.decode(torch.zeros(1, 49))


@pytest.mark.parametrize(
    "field,value",
    [
        ("codebook_size", 1),
        ("codebook_size", 70000),
        ("codebook_size", 2.5),
        ("hidden_channels", 0),
        ("image_size", 30),  # not divisible by 2**downsample = 4
        ("downsample", -1),
        ("commitment_cost", -0.1),
        ("ema_decay", 1.0),
        ("ema_epsilon", 0.0),
        ("in_channels", True),
    ],
)
def test_bad_config_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"`{field}`={value!r} is invalid; allowed"):
        VQVAEConfig(**{field: value})


def test_config_grid():
    assert VQVAEConfig().grid_size == (7, 7) and VQVAEConfig().num_tokens == 49
    assert VQVAEConfig(downsample=1).grid_size == (14, 14)


def test_save_pretrained_round_trip_is_identical(tmp_path):
    model = tiny_vq()
    model.train()(images(4))  # move the EMA buffers away from their init
    model.eval()
    model.save_pretrained(tmp_path / "vq")
    names = sorted(p.name for p in (tmp_path / "vq").iterdir())
    assert names == ["checksums.json", "config.json", "configuration_vqvae.py", "model.safetensors",
                     "modeling_vqvae.py", "validation_fpmgm.py"]
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert config["model_type"] == "fpmgm_vqvae"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vqvae.VQVAEConfig",
        "AutoModel": "modeling_vqvae.VQVAEModel",
    }
    loaded = VQVAEModel.from_pretrained(tmp_path / "vq").eval()
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    x = images(3, seed=1)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded(x).reconstruction, model(x).reconstruction)
    from transformers import AutoModel

    assert type(AutoModel.from_pretrained(tmp_path / "vq")) is VQVAEModel


def test_remote_code_load_without_fpmgm_hf(tmp_path):
    model = tiny_vq()
    save = tmp_path / "vq"
    model.save_pretrained(save)
    x = images(2, seed=2)
    torch.save(x, tmp_path / "x.pt")
    result = run_isolated(
        f"""
        import json, torch
        from transformers import AutoConfig, AutoModel
        cfg = AutoConfig.from_pretrained({str(save)!r}, trust_remote_code=True)
        m = AutoModel.from_pretrained({str(save)!r}, trust_remote_code=True).eval()
        x = torch.load({str(tmp_path / "x.pt")!r})
        ids = m.encode(x)
        torch.save(m.decode(ids), {str(tmp_path / "recon.pt")!r})
        print(json.dumps({{"module": type(m).__module__, "cfg": type(cfg).__name__, "ids": ids.tolist()}}))
        """,
        tmp_path,
    )
    assert result["module"].startswith("transformers_modules"), result["module"]
    assert result["cfg"] == "VQVAEConfig"
    assert result["ids"] == model.encode(x).tolist()
    assert len(set(result["ids"][0])) > 1  # a non-trivial check
    # same weights and ids; conv kernels may sum in another order in another process
    torch.testing.assert_close(torch.load(tmp_path / "recon.pt"), model.decode(model.encode(x)), rtol=0, atol=1e-6)


def test_evaluate_reconstruction_metrics():
    model = tiny_vq()
    metrics = evaluate_reconstruction(model, images(5), batch_size=2)
    recon = model.decode(model.encode(images(5)))
    mse = (recon - images(5).unsqueeze(1).float() / 255).pow(2).mean().item()
    assert metrics["mse"] == pytest.approx(mse, rel=1e-5)
    assert metrics["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
    assert 1 <= metrics["codes_used"] <= 32 and 1 <= metrics["perplexity"] <= metrics["codes_used"] + 1e-6


def _mnist(n):
    return load_image_dataset("mnist", "train")[0][:n]


def test_short_training_lowers_reconstruction_loss_and_is_deterministic(tmp_path):
    x = _mnist(2000)
    config = VQVAEConfig(**{**TINY, "hidden_channels": 16})
    kwargs = dict(images=x, steps=60, batch_size=32, lr=3e-3, config=config, progress=False)
    model, summary = train_vqvae(out_dir=tmp_path / "vq", **kwargs)
    assert summary["final_recon_loss"] < 0.7 * summary["first_recon_loss"], summary  # ~0.51 measured
    assert not model.training
    saved = json.loads((tmp_path / "vq" / "vq_training.json").read_text())
    assert saved["steps"] == 60
    assert [p.name for p in tmp_path.iterdir()] == ["vq"]  # no temporary folders left behind
    loaded = VQVAEModel.from_pretrained(tmp_path / "vq")
    assert torch.equal(loaded.encode(x[:8]), model.encode(x[:8]))
    model2, _ = train_vqvae(steps=5, **{k: v for k, v in kwargs.items() if k != "steps"})
    model3, _ = train_vqvae(steps=5, **{k: v for k, v in kwargs.items() if k != "steps"})
    assert torch.equal(model2.quantizer.codebook, model3.quantizer.codebook)


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`steps`=0"):
        train_vqvae(images=_mnist(10), steps=0, progress=False)
    with pytest.raises(ValueError, match="`dataset`='cifar'"):
        train_vqvae(dataset="cifar", steps=1, progress=False)


def test_cli_train_then_encode(tmp_path, capsys):
    out = tmp_path / "vq"
    args = ["train", "--dataset", "mnist", "--steps", "3", "--batch-size", "8", "--num-train", "64",
            "--hidden-channels", "8", "--codebook-size", "16", "--code-dim", "4", "--eval-images", "16",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["test"]["num_images"] == 16
    assert (out / "model.safetensors").exists()
    npz = tmp_path / "codes.npz"
    assert main(["encode", "--model", str(out), "--dataset", "mnist", "--split", "test", "--out", str(npz)]) == 0
    with np.load(npz) as data:
        assert data["tokens"].shape == (10000, 7, 7) and data["tokens"].dtype == np.uint16
        assert data["labels"].shape == (10000,) and data["labels"].dtype == np.int64
        assert int(data["codebook_size"]) == 16 and data["grid_size"].tolist() == [7, 7]
        assert data["tokens"].max() < 16
        model = VQVAEModel.from_pretrained(out)
        x = load_image_dataset("mnist", "test")[0][:5]
        assert np.array_equal(data["tokens"][:5].reshape(5, -1), model.encode(x).numpy())


def test_reconstruction_fid_uses_reconstructions_and_reports_the_floor(monkeypatch):
    import fpmgm_hf.evaluation.metrics as metrics
    from fpmgm_hf.images.vq import reconstruction_fid

    class PooledPixels:  # stands in for the Inception net (a slow, asset-backed test covers that net)
        def __init__(self, batch_size):
            pass

        def __call__(self, imgs):
            x = torch.as_tensor(np.asarray(imgs)).double().view(len(imgs), 1, 28, 28)
            return torch.nn.functional.avg_pool2d(x, 7).flatten(1)  # (N, 16)

    monkeypatch.setattr(metrics, "InceptionFeatures", PooledPixels)
    x = _mnist(80)
    out = reconstruction_fid(tiny_vq(), x, 40)
    feats = PooledPixels(0)
    recon = (tiny_vq()(torch.as_tensor(x[:40])).reconstruction[:, 0].clamp(0, 1) * 255).round().to(torch.uint8)
    assert out["rfid"] == pytest.approx(metrics.fid_from_features(feats(x[:40]), feats(recon.numpy())), rel=1e-9)
    assert out["floor"] == pytest.approx(metrics.fid_from_features(feats(x[:40]), feats(x[40:80])), rel=1e-9)
    assert out["rfid"] > out["floor"]  # an untrained tokenizer reconstructs badly
    with pytest.raises(ValueError, match="num_images"):
        reconstruction_fid(tiny_vq(), x, 41)
