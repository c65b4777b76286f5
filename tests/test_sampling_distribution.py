"""Reveal-first sampling is exact: `generate`'s ancestral sampler (unmasking drawn first, the head and the float64
draw only where a position unmasks) has the output distribution of the textbook full-vocabulary MDLM sampler,
written out here independently; a deliberately wrong variant is shown to fail the same test. And no vocabulary-sized
float64 tensor is built on the ancestral path."""

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration

V, MASK, L, T, N = 4, 3, 3, 2, 20000  # 3 tokens, 3 positions: 27 possible outputs


def tiny():
    torch.manual_seed(0)
    config = FPMGMConfig(vocab_size=V, mask_token_id=MASK, hidden_size=16, num_attention_heads=2, cond_dim=8,
                         max_position_embeddings=L, dropout=0.0)
    model = FPMGMForMaskedGeneration(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)  # an uneven, position-dependent distribution
    return model


@torch.no_grad()
def reference(model, n, seed, stale=False):
    """The full-vocabulary sampler: logits everywhere, SUBS, reveal with probability (a_s - a_t) / (1 - a_t),
    tokens by torch.multinomial. `stale=True` is the bug a reveal-first sampler could have: drawing every step's
    tokens from the first step's logits (a cache that missed the reveals)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, L), MASK)
    eps = 1e-3
    logits = None
    for i in range(T):
        t, s = 1 - i / T, 1 - (i + 1) / T
        if logits is None or not stale:
            logits = model(x, fp_iters=8).logits.double()
        logits[..., MASK] = -math.inf
        probs = logits.softmax(-1)  # (n, L, V)
        p_reveal = 1.0 if s <= 0 else ((1 - eps) * (t - s)) / ((1 - eps) * t)
        reveal = (x == MASK) & (torch.rand(x.shape, generator=g, dtype=torch.float64) < p_reveal)
        tokens = torch.multinomial(probs.view(-1, V), 1, generator=g).view(n, L)
        x = torch.where(reveal, tokens, x)
    return x


def histogram(x):
    codes = (x * torch.tensor([V * V, V, 1])).sum(1)
    return torch.bincount(codes, minlength=V ** 3).double()


def homogeneity_p(a, b):
    """p-value of the chi-square test that two histograms come from one distribution."""
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    na, nb = a.sum(), b.sum()
    pooled = (a + b) / (na + nb)
    stat = ((a - na * pooled) ** 2 / (na * pooled) + (b - nb * pooled) ** 2 / (nb * pooled)).sum()
    df = keep.sum() - 1
    assert df >= 3, "the model is too peaked for the test: most outputs never occur"
    return float(torch.special.gammaincc(df / 2.0, stat / 2.0))


def test_reveal_first_sampler_matches_the_full_vocabulary_sampler():
    model = tiny()
    ours = model.generate(batch_size=N, seq_len=L, num_steps=T, reuse="none", sampler="ancestral",
                          fp_iters_per_step=8, generator=torch.Generator().manual_seed(2))
    assert not (ours == MASK).any()
    ref = reference(model, N, seed=3)
    assert homogeneity_p(histogram(ours), histogram(ref)) > 1e-3
    # The test has power: the stale-logits bug changes the distribution, and fails it (so did 4 solver iterations
    # against the reference's 8 while this test was written).
    wrong = reference(model, N, seed=4, stale=True)
    assert homogeneity_p(histogram(ours), histogram(wrong)) < 1e-6


def test_temperature_is_applied_to_the_drawn_tokens_only():
    model = tiny()
    cold = model.generate(batch_size=N, seq_len=L, num_steps=T, reuse="none", temperature=0.3,
                          generator=torch.Generator().manual_seed(2))
    warm = model.generate(batch_size=N, seq_len=L, num_steps=T, reuse="none",
                          generator=torch.Generator().manual_seed(2))
    assert homogeneity_p(histogram(cold), histogram(warm)) < 1e-6  # the same test separates two temperatures


class _Float64Watch(TorchDispatchMode):
    """Records the largest float64 tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.largest = max(self.largest, t.numel())
        return out


def test_ancestral_path_builds_no_vocabulary_sized_float64_tensor():
    torch.manual_seed(0)
    config = FPMGMConfig(vocab_size=500, mask_token_id=499, hidden_size=16, num_attention_heads=2, cond_dim=8,
                         max_position_embeddings=64, dropout=0.0)
    model = FPMGMForMaskedGeneration(config).eval()
    B, steps = 4, 32
    with _Float64Watch() as watch:
        out = model.generate(batch_size=B, seq_len=64, num_steps=steps, generator=torch.Generator().manual_seed(0))
    assert not (out == 499).any()
    # (B, L, V) would be 128,000 float64s; a step draws at ~B * L / steps positions, each over V tokens.
    assert watch.largest < B * 64 * 500 / 4, watch.largest
