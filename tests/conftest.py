"""Shared fixtures: tiny configs that run in seconds on CPU; `slow` tests run only with RUN_SLOW=1."""

import os

import pytest
import torch

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration

VOCAB, MASK = 40, 39

# Tiny tensors: a second thread only adds synchronisation (and stalls badly on a busy 2-core machine).
torch.set_num_threads(1)


def tiny_config(**overrides) -> FPMGMConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        mask_token_id=MASK,
        hidden_size=32,
        num_attention_heads=4,
        cond_dim=16,
        max_position_embeddings=64,
        dropout=0.0,
        num_pre_layers=1,
        num_fp_layers=1,
        num_post_layers=1,
    )
    kwargs.update(overrides)
    return FPMGMConfig(**kwargs)


def tiny_text_run(root) -> list[str]:
    """`fpmgm-train` arguments (no --max-steps / --out) for a tiny run on a repeated sentence: writes the text, a
    300-token BPE tokenizer and a width-32 config under `root`."""
    import json

    from fpmgm_hf.data import train_bpe_tokenizer

    text = root / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran far away .\n" * 200)
    train_bpe_tokenizer([text.read_text()], 300, str(root / "tok"))
    (root / "arch.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4, "cond_dim": 16,
                                                "max_position_embeddings": 16}))
    return ["--data", str(text), "--tokenizer", str(root / "tok"), "--config", str(root / "arch.json"),
            "--seq-len", "16", "--batch-size", "2", "--save-every", "2", "--eval-every", "0", "--cpu"]


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values: the default init zeroes adaLN gates and the head, which
    would make many parity checks trivially pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0  # LayerNorm weights stay near 1
            p.copy_(base + torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model(seed: int = 0, **overrides) -> FPMGMForMaskedGeneration:
    torch.manual_seed(seed)
    return randomize_(FPMGMForMaskedGeneration(tiny_config(**overrides)), seed).eval()


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def model():
    return tiny_model()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
