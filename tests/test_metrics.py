"""Tests for fpmgm_hf.evaluation.metrics and the shipped evaluate modules (metrics/ links to them).

Fast tests use tiny stand-ins (a random 2-layer GPT-2, a pooling "extractor"). The real SmolLM2 eval LM
and the Inception network run only in the slow tests (RUN_SLOW=1).
"""

import logging
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpmgm_hf.evaluation import evaluate_module
from fpmgm_hf.evaluation import metrics as M

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning God created the heaven and the earth.",
    "Hello",
    "A much longer sentence that keeps going so that the batch has to be padded on the right, "
    "which checks that padding never leaks into the score.",
]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def gpt2_tok():
    from fpmgm_hf.data.assets import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def tiny_lm(gpt2_tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(gpt2_tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def reference_nll(text, model, tok, add_bos=True, max_length=1024):
    """Independent per-sample NLL: each text alone (no padding), summed cross-entropy per window."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = ([tok.bos_token_id] if add_bos else []) + ids
    total, count = 0.0, 0
    for s in range(0, len(ids), max_length):
        window = torch.tensor(ids[s:s + max_length])
        if len(window) < 2:
            continue
        with torch.no_grad():
            logits = model(window[None]).logits[0].double()
        total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    return total / count, count


# -------------------------------------------------------------------------------- generative PPL
def test_generative_perplexity_matches_independent_nll(tiny_lm, gpt2_tok):
    out = M.generative_perplexity(SENTENCES, tiny_lm, gpt2_tok, batch_size=3)
    refs = [reference_nll(t, tiny_lm, gpt2_tok) for t in SENTENCES]
    ref_nll = np.array([r[0] for r in refs])
    ref_n = np.array([r[1] for r in refs])
    np.testing.assert_allclose(out["per_sample_nll"], ref_nll, rtol=1e-5)
    # with a BOS prepended every real token is scored
    assert out["per_sample_num_tokens"] == [len(gpt2_tok(t)["input_ids"]) for t in SENTENCES] == ref_n.tolist()
    assert out["add_bos"] is True
    assert out["gen_ppl"] == pytest.approx(math.exp(ref_nll.mean()), rel=1e-5)  # Eq. 4
    assert out["pooled_ppl"] == pytest.approx(math.exp((ref_nll * ref_n).sum() / ref_n.sum()), rel=1e-5)
    assert out["gen_ppl"] != pytest.approx(out["pooled_ppl"], rel=1e-6)  # unequal lengths -> different
    assert out["num_samples"] == 4 and out["num_skipped"] == 0 and out["num_tokens"] == ref_n.sum()
    # the batch size must not matter
    out1 = M.generative_perplexity(SENTENCES, tiny_lm, gpt2_tok, batch_size=1)
    np.testing.assert_allclose(out1["per_sample_nll"], out["per_sample_nll"], rtol=1e-5)


def test_generative_perplexity_no_bos_and_windows(tiny_lm, gpt2_tok):
    # "Hello" is a single token: nothing to predict without BOS -> skipped (NaN) with a warning
    with pytest.warns(UserWarning, match="no scorable token"):
        out = M.generative_perplexity(SENTENCES, tiny_lm, gpt2_tok, add_bos=False)
    assert math.isnan(out["per_sample_nll"][2]) and out["num_skipped"] == 1
    for i in (0, 1, 3):  # MDLM protocol: tokens 2..n predicted
        nll, n = reference_nll(SENTENCES[i], tiny_lm, gpt2_tok, add_bos=False)
        assert out["per_sample_num_tokens"][i] == n == len(gpt2_tok(SENTENCES[i])["input_ids"]) - 1
        assert out["per_sample_nll"][i] == pytest.approx(nll, rel=1e-5)
    valid = [out["per_sample_nll"][i] for i in (0, 1, 3)]
    assert out["gen_ppl"] == pytest.approx(math.exp(np.mean(valid)), rel=1e-6)
    # long texts are split into independent windows of max_length tokens
    out = M.generative_perplexity([SENTENCES[3]], tiny_lm, gpt2_tok, max_length=8)
    nll, n = reference_nll(SENTENCES[3], tiny_lm, gpt2_tok, max_length=8)
    assert out["per_sample_num_tokens"] == [n] and out["per_sample_nll"][0] == pytest.approx(nll, rel=1e-5)


def test_generative_perplexity_input_checks(tiny_lm, gpt2_tok):
    with pytest.raises(TypeError):
        M.generative_perplexity("a single string", tiny_lm, gpt2_tok)

    class NoBos:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 100 for c in text]}

    with pytest.raises(ValueError, match="bos"):
        M.generative_perplexity(["abc"], tiny_lm, NoBos(), add_bos=True)
    out = M.generative_perplexity(["abcdef"], tiny_lm, NoBos())  # no BOS -> 5 scored tokens
    assert out["add_bos"] is False and out["per_sample_num_tokens"] == [5]


def test_load_eval_lm_local_and_offline(tmp_path, tiny_lm, gpt2_tok, monkeypatch):
    tiny_lm.save_pretrained(tmp_path)
    gpt2_tok.save_pretrained(tmp_path)
    model, tok, info = M.load_eval_lm(str(tmp_path))
    assert info["source"] == "local" and info["fallback"] is False
    assert info["comparable_to_published"] is False  # not gpt2-large's architecture
    assert type(model).__name__ == "GPT2LMHeadModel" and len(tok) == len(gpt2_tok)
    assert M._is_gpt2_large(type("C", (), dict(model_type="gpt2", n_layer=36, n_embd=1280, vocab_size=50257)))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError):  # not in the local cache, fallback disabled -> the load error surfaces
        M.load_eval_lm("gpt2-large", offline_fallback=False)
    monkeypatch.setattr(M, "_gguf_available", lambda: False)
    with pytest.raises(ImportError, match="pip install gguf"):
        M.load_eval_lm("gpt2-large")


# ------------------------------------------------------------------------------------- entropy
def test_unigram_entropy_hand_examples():
    ids = torch.tensor([[1, 1, 2, 2], [5, 5, 5, 5], [1, 2, 3, 4], [7, 7, 7, 8]])
    h = M.unigram_entropy(ids)
    assert h.dtype == torch.float64 and h.shape == (4,)
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    expected = torch.tensor([math.log(2), 0.0, math.log(4), float(-(p * p.log()).sum())], dtype=torch.float64)
    torch.testing.assert_close(h, expected)
    assert str(h[1].item()) == "0.0"  # not -0.0
    # variable-length lists, numpy input and ignored ids (e.g. padding 0)
    h = M.unigram_entropy([[3, 4, 0, 0, 0], [9], [0, 0]], ignore_ids=[0])
    assert h[0].item() == pytest.approx(math.log(2)) and h[1].item() == 0.0 and math.isnan(h[2].item())
    torch.testing.assert_close(M.unigram_entropy(ids.numpy()), M.unigram_entropy(ids.tolist()))
    with pytest.raises(ValueError):
        M.unigram_entropy(torch.zeros(2, 3, 4, dtype=torch.long))


# --------------------------------------------------------------------------------- TF1 resize
def naive_tf1_resize(img, out_h, out_w):
    """Per-pixel loop straight from TF1's resize_bilinear (align_corners=False, no half-pixel centres)."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w))
    sh, sw = np.float32(in_h / out_h), np.float32(in_w / out_w)
    for i in range(out_h):
        y = np.float32(i) * sh
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = np.float32(j) * sw
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, in_w - 1), x - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
            out[i, j] = top + (bottom - top) * fy
    return out


def test_tf1_resize_hand_example():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])
    # 2 -> 4: source coords 0, 0.5, 1, 1.5 (clamped to the last pixel), no half-pixel offset
    expected = torch.tensor([[0.0, 5.0, 10.0, 10.0],
                             [10.0, 15.0, 20.0, 20.0],
                             [20.0, 25.0, 30.0, 30.0],
                             [20.0, 25.0, 30.0, 30.0]])
    torch.testing.assert_close(M.resize_bilinear_tf1(x, 4), expected)
    # PyTorch's half-pixel bilinear is different (corner-anchored at 0 but 2.5 at column 1)
    assert not torch.allclose(F.interpolate(x[None, None], size=4, mode="bilinear", align_corners=False)[0, 0],
                              expected)
    # 4 -> 2 picks pixels 0 and 2; 3 -> 2 samples 0 and 1.5
    torch.testing.assert_close(M.resize_bilinear_tf1(torch.arange(4.0)[None], (1, 2)), torch.tensor([[0.0, 2.0]]))
    torch.testing.assert_close(M.resize_bilinear_tf1(torch.tensor([[0.0, 4.0, 6.0]]), (1, 2)),
                               torch.tensor([[0.0, 5.0]]))
    # same size is the identity; batch/channel dims pass through
    y = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(M.resize_bilinear_tf1(y, (5, 7)), y)
    with pytest.raises(TypeError):
        M.resize_bilinear_tf1(torch.zeros(2, 2, dtype=torch.uint8), 4)


def test_tf1_resize_matches_naive_loop():
    img = np.random.default_rng(0).integers(0, 256, (5, 7)).astype(np.float64)
    for out_h, out_w in [(3, 11), (13, 4), (29, 29)]:
        got = M.resize_bilinear_tf1(torch.from_numpy(img), (out_h, out_w)).numpy()
        np.testing.assert_allclose(got, naive_tf1_resize(img, out_h, out_w), rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------ Fréchet distance
def random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    # commuting (diagonal) covariances: d^2 = |mu1-mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # rotating both by the same orthogonal matrix keeps them commuting and the distance unchanged
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    got = M.frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-6)
    s = random_cov(rng, 6)
    assert M.frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        M.frechet_distance(mu1, s, mu2[:5], s[:5, :5])


def test_frechet_distance_vs_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    for d, rank in [(8, None), (16, 5)]:  # full rank, and singular (fewer samples than dims)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_cov(rng, d, rank), random_cov(rng, d, rank)
        covmean = linalg.sqrtm(s1 @ s2).real  # the pytorch-fid formula
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_feature_statistics_and_fid_from_features():
    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal((50, 4)), rng.standard_normal((40, 4)) + 1.0
    mu, cov = M.feature_statistics(f1)
    np.testing.assert_allclose(mu.numpy(), f1.mean(0))
    np.testing.assert_allclose(cov.numpy(), np.cov(f1, rowvar=False))
    expected = M.frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert M.fid_from_features(f1, f2) == pytest.approx(expected)
    assert M.fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        M.feature_statistics(f1[:1])


class PoolExtractor(torch.nn.Module):
    """Tiny stand-in for Inception: uint8 (N, H, W) / (N, C, H, W) -> 4x4 average pool -> fixed linear to 10-d."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(48, 10, generator=g)

    def forward(self, images):
        x = torch.as_tensor(images)
        x = x.unsqueeze(1) if x.dim() == 3 else x
        x = x.float().expand(-1, 3, -1, -1) / 255
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj


def image_sets(n=40):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
    b = np.clip(rng.normal(100, 60, (n, 12, 12)), 0, 255).astype(np.uint8)
    return a, b


def test_fid_with_injected_extractor():
    a, b = image_sets()
    ext = PoolExtractor()
    expected = M.fid_from_features(ext(a).double(), ext(b).double())
    assert M.fid(a, b, extractor=ext, batch_size=7) == pytest.approx(expected, rel=1e-6)
    assert M.fid(a, a, extractor=ext) == pytest.approx(0.0, abs=1e-9)
    # grayscale (N, H, W) == (N, 1, H, W) == channel-repeated (N, 3, H, W)
    a3 = np.repeat(a[:, None], 3, axis=1)
    assert M.fid(a3, b[:, None], extractor=ext) == pytest.approx(expected, rel=1e-6)


def test_fid_matches_torchmetrics():
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    a, b = image_sets()
    ext = PoolExtractor()
    tm = fid_mod.FrechetInceptionDistance(feature=ext)  # sends a dummy 299x299 uint8 image through ext
    tm.update(torch.from_numpy(np.repeat(a[:, None], 3, axis=1)), real=True)
    tm.update(torch.from_numpy(np.repeat(b[:, None], 3, axis=1)), real=False)
    assert float(tm.compute()) == pytest.approx(M.fid(a, b, extractor=ext), rel=1e-6)


def test_inception_input_handling():
    with pytest.raises(TypeError, match="uint8"):
        M._as_uint8_nchw(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="channels first"):
        M._as_uint8_nchw(np.zeros((2, 8, 8, 3), dtype=np.uint8))
    x = M._as_uint8_nchw(np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4))
    assert x.shape == (2, 3, 4, 4) and torch.equal(x[:, 0], x[:, 2])


# ------------------------------------------------------------------------------ evaluate modules
def test_evaluate_unigram_entropy_module():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(evaluate_module("unigram_entropy"))
    preds = [[1, 1, 2, 2, 0], [3, 4, 5], [6, 6, 6, 0, 0]]
    out = metric.compute(predictions=preds, ignore_ids=[0])
    expected = M.unigram_entropy(preds, ignore_ids=[0])
    np.testing.assert_allclose(out["per_sample_entropy"], expected.numpy())
    assert out["entropy"] == pytest.approx(expected.mean().item())


def test_evaluate_generative_perplexity_module(tiny_lm, gpt2_tok):
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(evaluate_module("generative_perplexity"))
    out = metric.compute(predictions=SENTENCES, model=tiny_lm, tokenizer=gpt2_tok, batch_size=2)
    ref = M.generative_perplexity(SENTENCES, tiny_lm, gpt2_tok)
    assert out["gen_ppl"] == pytest.approx(ref["gen_ppl"], rel=1e-6)
    assert out["pooled_ppl"] == pytest.approx(ref["pooled_ppl"], rel=1e-6)
    assert out["eval_lm"]["comparable_to_published"] is False and out["eval_lm"]["source"] == "injected"


def test_evaluate_fid_module():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(evaluate_module("fid"))
    a, b = image_sets(20)
    ext = PoolExtractor()
    out = metric.compute(predictions=a, references=b, extractor=ext)
    assert out["fid"] == pytest.approx(M.fid(a, b, extractor=ext), rel=1e-6)
    assert out["num_predictions"] == out["num_references"] == 20
    # channels-first colour layout goes through the second feature set
    a3, b3 = np.repeat(a[:, None], 3, axis=1), np.repeat(b[:, None], 3, axis=1)
    out3 = metric.compute(predictions=a3, references=b3, extractor=ext)
    assert out3["fid"] == pytest.approx(out["fid"], rel=1e-6)


# ------------------------------------------------------------------------------------ slow, real
FLUENT = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch of his old house.",
    "Scientists have discovered a new species of frog in the rainforests of South America.",
    "She opened the window to let the fresh morning air into the small kitchen.",
    "The city council will meet next week to discuss the budget for the new public library.",
]


@pytest.mark.slow
def test_real_eval_lm_fluent_beats_shuffled(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never download gpt2-large in a test: exercise the fallback
    with caplog.at_level(logging.WARNING, logger="fpmgm_hf.evaluation.metrics"):
        model, tok, info = M.load_eval_lm()
    assert info["fallback"] is True and info["comparable_to_published"] is False
    assert "NOT comparable" in caplog.text
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(s.split(), len(s.split()))) for s in FLUENT]
    fluent = M.generative_perplexity(FLUENT, model, tok, eval_info=info)
    mixed = M.generative_perplexity(shuffled, model, tok, eval_info=info)
    print(f"\nSmolLM2 fallback: fluent gen_ppl={fluent['gen_ppl']:.1f} pooled={fluent['pooled_ppl']:.1f}; "
          f"shuffled gen_ppl={mixed['gen_ppl']:.1f} pooled={mixed['pooled_ppl']:.1f}")
    assert fluent["gen_ppl"] < 100
    assert mixed["gen_ppl"] > 10 * fluent["gen_ppl"]
    assert fluent["eval_lm"] is info


@pytest.mark.slow
def test_real_inception_fid_mnist_vs_fashion():
    from fpmgm_hf.data.assets import load_image_dataset

    n = 64
    mnist_train = load_image_dataset("mnist", "train")[0][:n]
    mnist_test = load_image_dataset("mnist", "test")[0][:n]
    fashion = load_image_dataset("fashion_mnist", "test")[0][:n]
    ext = M.InceptionFeatures(batch_size=32)
    feats = {k: ext(v) for k, v in [("train", mnist_train), ("test", mnist_test), ("fashion", fashion)]}
    assert feats["train"].shape == (n, 2048) and feats["train"].dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = M.fid_from_features(feats["train"], feats["test"])
        other = M.fid_from_features(feats["train"], feats["fashion"])
    print(f"\nFID n={n}: MNIST train vs test {same:.1f}; MNIST vs Fashion-MNIST {other:.1f}")
    assert 0 < same < 0.5 * other
    # preprocessing: a 299x299 input is not resized, and the scale is (x - 128) / 128
    big = np.full((1, 299, 299), 255, dtype=np.uint8)
    assert torch.allclose(ext.preprocess(big), torch.full((1, 3, 299, 299), 127 / 128))
