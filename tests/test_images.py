"""Image modality (FP-MaskGIT): class conditioning / CFG, 2-D positions, token grids through a tiny VQ
tokenizer, bad input, and `image_train` (loss goes down, exact resume, export with the VQ folder)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration, VQVAEConfig, VQVAEModel
from fpmgm_hf.images.train import _strip_modality, load_image_model, load_token_grids, main, pack, unpack

K, GRID, NUM_CLASSES = 16, (7, 7), 10  # codebook, token grid, classes
TINY = dict(hidden_size=32, num_attention_heads=4, cond_dim=16, dropout=0.0, num_pre_layers=1, num_fp_layers=1,
            num_post_layers=1, fp_train_nograd_iters=[0, 1], fp_train_grad_iters=[1, 2], fp_max_iter=2)


def image_config(**overrides) -> FPMGMConfig:
    fields = dict(TINY, vocab_size=K + 1, mask_token_id=K, num_classes=NUM_CLASSES, position_encoding="rope_2d",
                  grid_size=GRID, max_position_embeddings=49)
    fields.update(overrides)
    return FPMGMConfig(**fields)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(FPMGMForMaskedGeneration(image_config(**overrides)), seed=seed).eval()


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def write_grids(path, n=96, grid=GRID, k=K, max_label=NUM_CLASSES - 1, seed=0):
    """Learnable synthetic grids: each class is a fixed pattern, with a few random tokens."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max_label + 1, n).astype(np.int64)
    cells = np.arange(grid[0] * grid[1])
    tokens = (labels[:, None] * 3 + cells[None, :] // 7) % k
    noise = rng.random(tokens.shape) < 0.1
    tokens = np.where(noise, rng.integers(0, k, tokens.shape), tokens).reshape(n, *grid).astype(np.uint16)
    np.savez(path, tokens=tokens, labels=labels, codebook_size=np.int64(k), grid_size=np.array(grid))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_assets")
    write_grids(root / "toy_train.npz", n=96, seed=0)
    write_grids(root / "toy_test.npz", n=32, seed=1)
    torch.manual_seed(0)
    VQVAEModel(VQVAEConfig(codebook_size=K, hidden_channels=8, code_dim=4)).save_pretrained(root / "vq")
    (root / "tiny.json").write_text(json.dumps(TINY))
    return types.SimpleNamespace(root=root, train=str(root / "toy_train.npz"), vq=str(root / "vq"),
                                 config=str(root / "tiny.json"))


def run_main(assets, out, *extra):
    reset_accelerate()
    arch = [] if "--from" in extra else ["--config", assets.config]
    argv = ["--data", assets.train, "--vq", assets.vq, *arch, "--out", str(out),
            "--batch-size", "8", "--warmup-steps", "1", "--eval-batches", "0", "--threads", "1", "--cpu", *extra]
    return main(argv)


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


# --------------------------------------------------------------------------------------- conditioning / CFG


class Spy:
    """Records the class labels and batch size of every forward of `model`."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.model.register_forward_pre_hook(self.hook, with_kwargs=True)  # generate calls the body

    def hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        labels = kwargs.get("class_labels")
        self.calls.append((ids.shape[0], None if labels is None else labels.clone()))


def test_cfg_uses_null_class_for_unconditional_branch():
    model = tiny_model()
    spy = Spy(model)
    labels = torch.tensor([0, 3, 9])
    model.generate(batch_size=3, seq_len=49, class_labels=labels, guidance_scale=3.0, sampler="confidence",
                   order="halton", num_steps=4, budget=None, generator=torch.Generator().manual_seed(0))
    spy.handle.remove()
    assert spy.calls
    for batch, seen in spy.calls:  # every call runs [conditional rows; null rows] of the rows it updates
        assert seen is not None and batch == seen.shape[0] and batch % 2 == 0
        cond, null = seen.chunk(2)
        assert torch.all(null == NUM_CLASSES)
        assert set(cond.tolist()) <= set(labels.tolist())
    assert torch.equal(spy.calls[0][1], torch.tensor([0, 3, 9, 10, 10, 10]))


@pytest.mark.parametrize("fp_layers", [0, 1])
def test_guidance_scale_one_equals_conditional_path(fp_layers):
    model = randomize_(tiny_model(num_fp_layers=fp_layers), std=0.3)
    first_logits = []  # the head inputs of every call of the denoiser body (generate runs the head apart)
    handle = model.model.register_forward_hook(
        lambda m, a, out: first_logits.append(out.last_hidden_state.detach().clone()))
    kw = dict(batch_size=4, seq_len=49, class_labels=torch.tensor([1, 2, 5, 7]), sampler="confidence",
              order="halton", num_steps=6, randomness=1.0, reuse="none")
    plain = model.generate(**kw, generator=torch.Generator().manual_seed(1))
    n_plain = len(first_logits)
    guided = model.generate(**kw, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    handle.remove()
    # first call (all-mask canvas): the conditional half of the guided batch is the plain conditional call
    cond, _ = first_logits[n_plain].chunk(2)
    assert torch.allclose(cond, first_logits[0], atol=1e-5)
    assert torch.equal(plain, guided)
    strong = model.generate(**kw, guidance_scale=5.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(plain, strong)


def test_class_labels_change_logits_and_null_class_is_default():
    model = tiny_model()
    z = torch.full((2, 49), K)
    a = model(z, class_labels=torch.tensor([0, 0])).logits
    b = model(z, class_labels=torch.tensor([4, 4])).logits
    null = model(z, class_labels=torch.tensor([NUM_CLASSES] * 2)).logits
    default = model(z).logits
    assert not torch.allclose(a, b)
    assert torch.allclose(null, default)


def test_two_d_positions_are_used():
    model = tiny_model()
    pos = model.model._positions(49, "cpu") if hasattr(model, "model") else None
    if pos is None:  # locate the inner FPMGMModel
        inner = next(m for m in model.modules() if hasattr(m, "_positions"))
        pos = inner._positions(49, "cpu")
    assert pos.shape == (49, 2)
    assert pos[8].tolist() == [1, 1] and pos[48].tolist() == [6, 6]
    flat = FPMGMForMaskedGeneration(image_config(position_encoding="rope_1d", grid_size=None)).eval()
    flat.load_state_dict(model.state_dict())
    ids = torch.randint(0, K, (2, 49), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    assert not torch.allclose(model(ids, class_labels=labels).logits, flat(ids, class_labels=labels).logits)


# ------------------------------------------------------------------------------------- grids through the VQ


def test_generated_grids_decode_through_tiny_vq():
    model = tiny_model()
    torch.manual_seed(0)
    vq = VQVAEModel(VQVAEConfig(codebook_size=K, hidden_channels=8, code_dim=4)).eval()
    ids = model.generate(batch_size=5, seq_len=49, class_labels=torch.arange(5), guidance_scale=2.0,
                         sampler="confidence", order="halton", reuse="3sr", budget=12, randomness=1.0,
                         generator=torch.Generator().manual_seed(0))
    assert ids.shape == (5, 49)
    assert int(ids.min()) >= 0 and int(ids.max()) < K  # no mask id left, all codebook entries
    images = vq.decode(ids)
    assert images.shape == (5, 1, 28, 28)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    images_grid = vq.decode(ids.view(5, 7, 7))
    assert torch.allclose(images, images_grid)


def test_png_grid_writer(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from generate_images import png_bytes, save_grid, tile

    images = np.random.default_rng(0).integers(0, 256, (12, 28, 28)).astype(np.uint8)
    grid = tile(images, cols=5, pad=2, scale=1)
    assert grid.shape == (3 * 30 + 2, 5 * 30 + 2)
    assert np.array_equal(grid[2:30, 2:30], images[0])
    save_grid(tmp_path / "g.png", images, cols=5)
    data = (tmp_path / "g.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(tmp_path / "g.png") as im:
        assert np.array_equal(np.asarray(im), tile(images, cols=5))
    with pytest.raises(ValueError):
        png_bytes(np.zeros((2, 3, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_token_grids_and_labels(tmp_path):
    good = write_grids(tmp_path / "good.npz", n=8)
    tokens, labels, info = load_token_grids(good, GRID, K, NUM_CLASSES)
    assert tokens.shape == (8, 49) and info == {"codebook_size": K, "grid_size": GRID}
    assert torch.equal(unpack(pack(tokens, labels))[0], tokens)
    with pytest.raises(ValueError, match="8x8 but the model expects 7x7"):
        load_token_grids(write_grids(tmp_path / "big.npz", n=4, grid=(8, 8)), GRID)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\)"):
        load_token_grids(write_grids(tmp_path / "lab.npz", n=40, max_label=12), GRID, K, NUM_CLASSES)
    with pytest.raises(ValueError, match="token ids must lie"):
        load_token_grids(good, GRID, codebook_size=4)
    np.savez(tmp_path / "flat.npz", tokens=np.zeros((3, 49), np.uint16), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="shape"):
        load_token_grids(tmp_path / "flat.npz", GRID)


def test_bad_class_and_image_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.zeros(1, 49, dtype=torch.long), class_labels=torch.tensor([NUM_CLASSES + 1]))
    with pytest.raises(ValueError, match="class_labels"):
        model.generate(batch_size=2, seq_len=49, class_labels=torch.tensor([0, 11]), num_steps=2,
                       sampler="confidence")
    vq = VQVAEModel(VQVAEConfig(codebook_size=K, hidden_channels=8, code_dim=4))
    with pytest.raises(ValueError, match="image size 28x28"):
        vq.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="ids"):
        vq.decode(torch.zeros(2, 64, dtype=torch.long))


def test_main_rejects_bad_data(assets, tmp_path):
    with pytest.raises(ValueError, match="class ids"):
        run_main(assets, tmp_path / "a", "--num-classes", "5", "--max-steps", "1")
    with pytest.raises(ValueError, match="neither"):
        run_main(types.SimpleNamespace(**{**vars(assets), "train": "nope"}), tmp_path / "b", "--max-steps", "1")
    vq8 = tmp_path / "vq8"
    VQVAEModel(VQVAEConfig(image_size=32, codebook_size=K, hidden_channels=8, code_dim=4)).save_pretrained(vq8)
    with pytest.raises(ValueError, match="7x7 but the model expects 8x8"):
        run_main(types.SimpleNamespace(**{**vars(assets), "vq": str(vq8)}), tmp_path / "c", "--max-steps", "1")


def test_strip_modality():
    assert _strip_modality(["--modality", "image", "--data", "x"]) == ["--data", "x"]
    assert _strip_modality(["--modality=image", "--out", "o"]) == ["--out", "o"]


# ---------------------------------------------------------------------------------------------- training


def test_training_lowers_loss_and_exports_with_vq(assets, tmp_path):
    out = tmp_path / "run"
    final = run_main(assets, out, "--modality", "image", "--max-steps", "60", "--lr", "3e-3", "--eval-every", "60",
                     "--save-every", "0")
    log = read_log(out)
    evals = [r for r in log if "val_ce" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["val_ce"] < evals[0]["val_ce"] - 0.1
    losses = [r["loss"] for r in log if "loss" in r]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1
    model, vq = load_image_model(final)
    assert model.config.num_classes == NUM_CLASSES and tuple(model.config.grid_size) == GRID
    assert model.config.vocab_size == K + 1 and model.config.mask_token_id == K
    assert model.generation_config.order == "halton" and model.generation_config.sampler == "confidence"
    assert vq is not None and vq.config.codebook_size == K
    info = json.loads((Path(final) / "image_info.json").read_text())
    assert info["vq_subfolder"] == "vq" and info["num_classes"] == NUM_CLASSES
    ids = model.generate(batch_size=2, class_labels=torch.tensor([1, 2]), guidance_scale=2.0, budget=9,
                         generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 49) and vq.decode(ids).shape == (2, 1, 28, 28)

    # The card's usage snippet runs against the folder (remote code, offline, a fresh process).
    card = (Path(final) / "README.md").read_text()
    assert "image-generation" in card and str(tmp_path) not in card and "github.com" not in card
    snippet = card.split("```python\n")[1].split("```")[0].replace('"run/final"', repr(str(final)))
    snippet += "print(tuple(codes.shape), tuple(images.shape))\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and "(8, 49) (8, 1, 28, 28)" in proc.stdout, proc.stderr[-3000:]


def test_consistency_stage_runs(assets, tmp_path):
    base = run_main(assets, tmp_path / "base", "--max-steps", "2", "--eval-every", "0", "--save-every", "0")
    run_main(assets, tmp_path / "cofre", "--from", base, "--max-steps", "3", "--consistency-weight", "0.5",
             "--consistency-warmup", "2", "--eval-every", "3", "--save-every", "0")
    steps = [r for r in read_log(tmp_path / "cofre") if "loss" in r]
    assert [r["lambda"] for r in steps] == [0.0, 0.25, 0.5]
    assert all(np.isfinite(r["consistency"]) and r["consistency"] >= 0 for r in steps)
    assert all(abs(r["loss"] - (r["task"] + r["lambda"] * r["consistency"])) < 1e-4 for r in steps)


def test_exact_resume(assets, tmp_path):
    common = ("--max-steps", "4", "--eval-every", "0", "--seed", "3")
    straight = run_main(assets, tmp_path / "straight", *common, "--save-every", "0")
    run_main(assets, tmp_path / "split", "--max-steps", "2", "--eval-every", "0", "--seed", "3", "--save-every", "2")
    resumed = run_main(assets, tmp_path / "split", *common, "--save-every", "2", "--resume", "latest")
    a = FPMGMForMaskedGeneration.from_pretrained(straight).state_dict()
    b = FPMGMForMaskedGeneration.from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_shared_entry_point_dispatches_image_training(assets, tmp_path):
    from fpmgm_hf.training.train import main as train_main

    reset_accelerate()
    out = tmp_path / "via_train"
    argv = ["--modality", "image", "--data", assets.train, "--vq", assets.vq, "--config", assets.config,
            "--out", str(out), "--batch-size", "8", "--warmup-steps", "1", "--eval-batches", "0", "--threads", "1",
            "--cpu", "--max-steps", "2", "--eval-every", "0", "--save-every", "0"]
    final = train_main(argv)
    assert os.path.isfile(os.path.join(final, "config.json")) and os.path.isdir(os.path.join(final, "vq"))
