"""Training objectives against independent computations on hand-built batches."""

import math

import pytest
import torch

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration
from fpmgm_hf.scheduling_fpmgm import loglinear_sigma
from fpmgm_hf.training.objectives import (
    consistency_loss,
    consistency_weight_at,
    maskgit_loss,
    mdlm_nelbo,
    nested_masks,
    sample_times,
)

V, MASK, EPS = 64, 63, 1e-3


def make_model(seed=0, std=0.05, **overrides):
    """A tiny model with every weight random (the default init zeroes the adaLN gates and the head)."""
    kwargs = dict(vocab_size=V, mask_token_id=MASK, hidden_size=32, num_attention_heads=4, cond_dim=16,
                  dropout=0.0, max_position_embeddings=64, num_pre_layers=1, num_fp_layers=1, num_post_layers=1,
                  fp_train_nograd_iters=(0, 0), fp_train_grad_iters=(2, 2), fp_max_iter=3, time_conditioning=True,
                  fp_residual_reg=0.0)  # the task losses alone; the fixed-point penalty is tested in test_stability
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = FPMGMForMaskedGeneration(FPMGMConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + std * torch.randn(p.shape, generator=g))
    return model


def clean_batch(B=4, L=12, seed=1):
    return torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(seed))


def reference_nll(logits, x0, masked):
    """-log p(x0 | z) at masked positions, mask logit excluded, written with explicit loops (float64)."""
    B, L, _ = logits.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            if masked[b, i]:
                row = logits[b, i].double().clone()
                row[MASK] = -math.inf
                out[b, i] = -(row[x0[b, i]] - torch.logsumexp(row, 0))
    return out


# ------------------------------------------------------------------------------------------------ MDLM


def test_sample_times_antithetic_grid():
    t = sample_times(8, generator=torch.Generator().manual_seed(3), eps=EPS)
    gaps = t.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - EPS) / 8), rtol=0, atol=1e-5)
    assert (t >= EPS).all() and (t <= 1).all()


def test_loglinear_weight_is_one_over_t():
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    sigma = loglinear_sigma(t, EPS)
    dsigma = (1 - EPS) / (1 - (1 - EPS) * t)
    torch.testing.assert_close(dsigma / torch.expm1(sigma), 1 / t)


@pytest.mark.parametrize("padded", [False, True])
def test_mdlm_nelbo_matches_independent_computation(padded):
    model, x0 = make_model().train(), clean_batch()
    attn = torch.ones_like(x0)
    if padded:
        attn[1, 8:] = 0
        attn[3, 5:] = 0
    loss, aux = mdlm_nelbo(model, x0, generator=torch.Generator().manual_seed(7), eps=EPS,
                           attention_mask=attn if padded else None)

    g = torch.Generator().manual_seed(7)  # replay the documented draws: one antithetic u, then one u per token
    u = torch.rand(1, generator=g)
    t = EPS + (1 - EPS) * ((u + torch.arange(4) / 4) % 1)
    masked = (torch.rand(x0.shape, generator=g) < (1 - EPS) * t[:, None]) & attn.bool()
    z = torch.where(masked, MASK, x0)
    logits = model(z, timesteps=loglinear_sigma(t, EPS), attention_mask=attn if padded else None,
                   generator=g).logits
    nll = reference_nll(logits, x0, masked)
    expected = (nll / t.double()[:, None]).sum() / attn.sum()

    assert torch.equal(aux["z"], z) and torch.equal(aux["t"], t)
    assert not (aux["masked"] & ~attn.bool()).any()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_mdlm_nelbo_visible_tokens_contribute_nothing():
    """A model that is certain of x0 everywhere except one masked position scores only that position."""
    x0 = clean_batch(B=2, L=6)

    class Oracle(torch.nn.Module):
        config = FPMGMConfig(vocab_size=V, mask_token_id=MASK, hidden_size=8, num_attention_heads=2, cond_dim=4)

        def forward(self, z, **kwargs):
            logits = torch.zeros(*z.shape, V)
            logits[..., MASK] = 100.0  # must be ignored by SUBS
            return type("Out", (), {"logits": logits})()

    loss, aux = mdlm_nelbo(Oracle(), x0, generator=torch.Generator().manual_seed(0))
    n_masked = aux["masked"].sum(1).double()
    expected = (n_masked * math.log(V - 1) / aux["t"].double()).sum() / x0.numel()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_mdlm_nelbo_rejects_masked_clean_data():
    x0 = clean_batch()
    x0[0, 0] = MASK
    with pytest.raises(ValueError, match="mask token"):
        mdlm_nelbo(make_model(), x0, generator=torch.Generator())


# --------------------------------------------------------------------------------------------- MaskGIT


def test_maskgit_loss_matches_independent_computation():
    model = make_model(num_classes=5).train()
    x0, labels = clean_batch(B=6, L=10), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, aux = maskgit_loss(model, x0, generator=torch.Generator().manual_seed(11), class_labels=labels,
                             label_dropout=0.5)

    g = torch.Generator().manual_seed(11)  # ratio u, per-token scores, label-dropout draws
    r = torch.cos(math.pi / 2 * (1 - torch.rand(6, generator=g)))
    n = torch.ceil(r * 10).long().clamp(1, 10)
    scores = torch.rand(6, 10, generator=g)
    masked = torch.zeros(6, 10, dtype=torch.bool)
    for b in range(6):
        masked[b, scores[b].topk(int(n[b]), largest=False).indices] = True
    dropped = torch.where(torch.rand(6, generator=g) < 0.5, 5, labels)
    z = torch.where(masked, MASK, x0)
    logits = model(z, timesteps=loglinear_sigma(r), class_labels=dropped, generator=g).logits
    expected = reference_nll(logits, x0, masked).sum() / masked.sum()

    assert torch.equal(aux["masked"], masked) and torch.equal(aux["class_labels"], dropped)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_maskgit_masks_at_least_one_and_label_dropout_rate():
    model = make_model(num_classes=3, num_fp_layers=0)
    g, drops, rows = torch.Generator().manual_seed(0), 0, 0
    for _ in range(20):
        labels = torch.zeros(64, dtype=torch.long)
        _, aux = maskgit_loss(model, clean_batch(B=64, L=4), generator=g, class_labels=labels)
        assert (aux["masked"].sum(1) >= 1).all()
        drops += int((aux["class_labels"] == 3).sum())
        rows += 64
    assert 0.07 < drops / rows < 0.13


# ----------------------------------------------------------------------------------------- consistency


def test_nested_masks_teacher_strictly_inside_student():
    x0 = clean_batch(B=16, L=10)
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        attn = (torch.rand(x0.shape, generator=g) < 0.8).long()
        attn[:, 0] = 1
        z_s, z_c, t_s, t_c, student, teacher = nested_masks(x0, MASK, generator=g, attention_mask=attn)
        assert not (teacher & ~student).any(), "teacher must be a subset of student"
        assert (student.sum(1) > teacher.sum(1)).all(), "teacher must be strictly cleaner"
        assert (student.sum(1) >= 1).all()
        assert not (student & ~attn.bool()).any()
        assert torch.equal(z_s == MASK, student) and torch.equal(z_c == MASK, teacher)
        assert torch.equal(z_s[~student], x0[~student]) and torch.equal(z_c[~teacher], x0[~teacher])
        assert (t_c >= EPS).all() and (t_c <= t_s).all()
        assert ((t_s - t_c >= 0.05 - 1e-6) | (t_c == EPS)).all()


def test_nested_masks_follow_thresholds_on_shared_u():
    g = torch.Generator().manual_seed(5)
    x0 = clean_batch(B=64, L=32)
    _, _, t_s, t_c, student, teacher = nested_masks(x0, MASK, generator=torch.Generator().manual_seed(5))
    u = torch.rand(x0.shape, generator=g)
    want_s = u < (1 - EPS) * t_s[:, None]
    # apart from the documented single-token fixes, the masks are thresholds of the same u
    assert (student ^ want_s).sum(1).le(1).all()
    assert (teacher ^ (u < (1 - EPS) * t_c[:, None])).sum(1).le(1).all()


def test_consistency_loss_matches_independent_computation():
    model, x0, w = make_model(std=0.3).train(), clean_batch(), 0.3
    loss, aux = consistency_loss(model, x0, generator=torch.Generator().manual_seed(2), weight=w)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    g = torch.Generator().manual_seed(2)
    z_s, z_c, t_s, t_c, student, teacher = nested_masks(x0, MASK, generator=g)
    out = model(z_s, timesteps=loglinear_sigma(t_s, EPS), generator=g)
    model.eval()
    with torch.no_grad():
        h_c = model(z_c, timesteps=loglinear_sigma(t_c, EPS)).last_hidden_state
    model.train()
    task = (reference_nll(out.logits, x0, student) / t_s.double()[:, None]).sum() / x0.numel()
    def standardise(h):  # LayerNorm without weights, written out
        h = h.double()
        return (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()

    per_pos = ((standardise(out.last_hidden_state) - standardise(h_c)) ** 2).mean(-1)
    cons = per_pos[student].mean().float()
    expected = task.float() + w * cons

    assert aux["consistency"] > 1e-4, "hidden states must differ for this test to mean anything"
    torch.testing.assert_close(aux["task"].double(), task, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["consistency"], cons.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert model.training


def test_consistency_loss_accepts_separate_teacher():
    model, teacher = make_model(0).train(), make_model(1).eval()
    x0 = clean_batch()
    _, a_self = consistency_loss(model, x0, generator=torch.Generator().manual_seed(0), weight=0.1)
    _, a_ema = consistency_loss(model, x0, generator=torch.Generator().manual_seed(0), weight=0.1, teacher=teacher)
    torch.testing.assert_close(a_self["task"], a_ema["task"])
    assert not torch.allclose(a_self["consistency"], a_ema["consistency"])
    assert not teacher.training


def test_consistency_weight_schedule():
    assert consistency_weight_at(0, 0.1, 100) == 0.0
    assert consistency_weight_at(50, 0.1, 100) == pytest.approx(0.05)
    assert consistency_weight_at(100, 0.1, 100) == pytest.approx(0.1)
    assert consistency_weight_at(10_000, 0.1, 100) == pytest.approx(0.1)
    assert consistency_weight_at(3, 0.2, 0) == pytest.approx(0.2)
    values = [consistency_weight_at(s, 0.1, 10) for s in range(15)]
    assert values == sorted(values)
