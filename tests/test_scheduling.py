"""Model-free generation pieces: 3SR weights, budget allocation, transitions, filtering."""

import math

import pytest
import torch

from fpmgm_hf.scheduling_fpmgm import (
    FP_SCHEDULES,
    MAX_BUDGET,
    MAX_FP_ITERS_PER_STEP,
    MAX_NUM_STEPS,
    allocate_iterations,
    ancestral_step,
    confidence_scores,
    confidence_step,
    filter_log_probs,
    halton_order,
    plan_budget,
    subs_log_probs,
    three_state_gamma,
)

M = 9  # mask id


def test_three_state_gamma_on_hand_built_transitions():
    prev = torch.tensor([[1, M, M, 2, M, 7]])
    cur = torch.tensor([[1, M, 5, 3, M, 7]])  # kept, still masked, revealed, changed, still masked, padding
    active = torch.tensor([[True, True, True, True, True, False]])
    gamma = three_state_gamma(prev, cur, M, active, 0.75, 0.90, 0.2)
    visible_fraction = 3 / 5  # tokens 1, 5, 3 out of 5 real positions
    g_mask = 0.75 + (0.90 - 0.75) * visible_fraction
    expected = torch.tensor([[1.0, g_mask, 0.2, 0.2, g_mask, 1.0]])
    torch.testing.assert_close(gamma, expected)


def test_three_state_gamma_interpolates_with_visible_fraction():
    for n_visible in range(5):
        cur = torch.tensor([[1] * n_visible + [M] * (4 - n_visible)])
        gamma = three_state_gamma(cur, cur, M, None, 0.5, 1.0, 0.0)
        masked = gamma[cur == M]
        assert torch.allclose(masked, torch.full_like(masked, 0.5 + 0.5 * n_visible / 4))


@pytest.mark.parametrize("kind", FP_SCHEDULES)
@pytest.mark.parametrize("budget,steps", [(96, 8), (96, None), (192, 16), (37, 5), (384, 32)])
def test_budget_accounting_is_exact(kind, budget, steps):
    plan = plan_budget(budget, steps, 1, 1, 1, kind, 4)
    cost = sum(1 + n + 1 for n in plan)
    assert cost <= budget and budget - cost < 1 + 1  # leftover smaller than one more iteration
    assert min(plan) >= 1 and (steps is None or len(plan) == steps)
    plan4 = plan_budget(budget * 3, steps, 4, 2, 4, kind, 4)  # FP-MaskGIT-like 4/1x2/4
    assert sum(4 + 2 * n + 4 for n in plan4) <= budget * 3


def test_schedules_have_the_promised_shape():
    dec = allocate_iterations(80, 8, "decreasing")
    inc = allocate_iterations(80, 8, "increasing")
    assert sum(dec) == sum(inc) == 80 and dec == sorted(dec, reverse=True) and inc == sorted(inc)
    assert allocate_iterations(80, 8, "fixed") == [10] * 8
    front = allocate_iterations(80, 8, "front_loaded")
    assert front[0] > front[-1]
    cos = allocate_iterations(80, 8, "cosine")
    assert cos[3] > cos[0] and cos[4] > cos[7]


def test_plain_stack_budget_is_steps_times_layers():
    assert plan_budget(96, None, 12, 0, 0) == [0] * 8
    assert len(plan_budget(768, None, 12, 0, 0)) == 64


def test_budget_below_minimum_names_budget_and_minimum():
    with pytest.raises(ValueError, match=r"`budget`=20 is below the minimum 24"):
        plan_budget(20, 8, 1, 1, 1)
    with pytest.raises(ValueError, match=r"`budget`=10 is below the minimum 12"):
        plan_budget(10, None, 12, 0, 0)
    with pytest.raises(ValueError, match="fp_schedule"):
        plan_budget(96, 8, 1, 1, 1, "sideways")


def test_subs_excludes_mask_and_carries_visible_tokens():
    logits = torch.randn(1, 3, 10)
    canvas = torch.tensor([[M, 4, M]])
    logp = subs_log_probs(logits, canvas, M)
    assert logp.dtype == torch.float64
    assert torch.isinf(logp[0, 0, M]) and torch.allclose(
        logp[0, 0].exp().sum(), torch.tensor(1.0, dtype=torch.float64)
    )
    assert logp[0, 1, 4] == 0 and torch.isinf(logp[0, 1, 5])


def test_filtering():
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64), -1)
    greedy = filter_log_probs(logp, temperature=0)
    assert greedy.argmax().item() == 0 and torch.isinf(greedy[0, 1:]).all()
    top2 = filter_log_probs(logp, top_k=2)
    assert torch.isfinite(top2[0, :2]).all() and torch.isinf(top2[0, 2:]).all()
    nucleus = filter_log_probs(logp, top_p=0.5)  # the top token alone holds ~0.64
    assert torch.isfinite(nucleus[0, 0]) and torch.isinf(nucleus[0, 1:]).all()


def test_ancestral_step_is_monotone_and_reveals_everything_at_s0():
    g = torch.Generator().manual_seed(0)
    canvas = torch.tensor([[M, 1, M, M, 2, M]])
    active = torch.ones_like(canvas, dtype=torch.bool)
    logp = torch.log_softmax(torch.randn(1, 6, 10, dtype=torch.float64), -1)
    logp[..., M] = -math.inf
    mid = ancestral_step(canvas, logp, 0.5, 0.25, M, active, g)
    assert mid[0, 1] == 1 and mid[0, 4] == 2
    final = ancestral_step(mid, logp, 0.25, 0.0, M, active, g)
    assert (final != M).all() and (final[mid != M] == mid[mid != M]).all()


def test_confidence_step_follows_the_schedule_and_halton_order():
    canvas = torch.full((2, 8), M)
    active = torch.ones_like(canvas, dtype=torch.bool)
    logp = torch.log_softmax(torch.randn(2, 8, 10, dtype=torch.float64), -1)
    logp[..., M] = -math.inf
    initial = torch.tensor([8, 8])
    out = confidence_step(canvas, logp, 0, 4, initial, M, active, torch.Generator().manual_seed(0))
    assert ((out != M).sum(1) == 8 - math.floor(8 * math.cos(math.pi / 2 * 0.25))).all()
    order = halton_order(2, 4)
    assert sorted(order.tolist()) == list(range(8))
    out = confidence_step(canvas, logp, 0, 8, initial, M, active, torch.Generator().manual_seed(0), order=order)
    assert (out[:, order[0]] != M).all() and ((out != M).sum(1) == 1).all()


def test_confidence_scores_follow_dreams_algs():
    p = torch.tensor([[[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]]], dtype=torch.float64)  # (1, 2, 3)
    logp, tokens = p.log(), torch.tensor([[1, 0]])
    torch.testing.assert_close(confidence_scores(logp, tokens, "maskgit_plus"), logp[0, [0, 1], [1, 0]][None])
    torch.testing.assert_close(confidence_scores(logp, tokens, "topk_margin"), torch.tensor([[0.3, 0.05]]).double())
    torch.testing.assert_close(confidence_scores(logp, tokens, "entropy"), (p * p.log()).sum(-1))
    one_hot = torch.tensor([[[0.0, -math.inf, -math.inf]]], dtype=torch.float64)  # 0 log 0 counts as 0
    assert confidence_scores(one_hot, torch.tensor([[0]]), "entropy").item() == 0
    a = confidence_scores(logp, tokens, "origin", torch.Generator().manual_seed(0))
    b = confidence_scores(logp, tokens, "origin", torch.Generator().manual_seed(1))
    assert a.shape == (1, 2) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="alg"):
        confidence_scores(logp, tokens, "greedy")


@pytest.mark.parametrize("alg,first", [("maskgit_plus", 0), ("topk_margin", 1), ("entropy", 2)])
def test_confidence_step_reveals_the_best_position_by_alg(alg, first):
    # position 0: highest top-1; position 1: largest margin; position 2: lowest entropy (peaked over 2 tokens).
    p = torch.tensor(
        [
            [0.60, 0.38, 0.02, 1e-9, 1e-9],  # top-1 0.60 (highest), margin 0.22, entropy ~0.76
            [0.45, 0.1375, 0.1375, 0.1375, 0.1375],  # margin 0.31 (largest), entropy ~1.44
            [0.56, 0.44, 1e-9, 1e-9, 1e-9],  # margin 0.12, entropy ~0.69 (lowest)
        ],
        dtype=torch.float64,
    )[None]
    logp = p.log()
    canvas = torch.full((1, 3), M)
    tokens_first = logp.argmax(-1)
    greedy = torch.full_like(logp, -math.inf).scatter_(-1, tokens_first.unsqueeze(-1), 0.0)
    out = confidence_step(
        canvas, greedy, 0, 3, torch.tensor([3]), M, torch.ones_like(canvas, dtype=torch.bool), alg=alg, score_logp=logp
    )
    assert (out != M).sum() == 1 and out[0, first] != M, out


def test_alg_temp_samples_positions_but_keeps_the_count():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(1, 10, 6, generator=g, dtype=torch.float64), -1)
    canvas = torch.full((1, 10), M)
    active = torch.ones_like(canvas, dtype=torch.bool)
    step = lambda seed: confidence_step(  # noqa: E731
        canvas, logp, 0, 4, torch.tensor([10]), M, active, torch.Generator().manual_seed(seed), alg_temp=5.0
    )
    runs = [step(seed) for seed in range(6)]
    assert all(int((r != M).sum()) == (10 - math.floor(10 * math.cos(math.pi / 8))) for r in runs)
    assert len({tuple((r != M)[0].tolist()) for r in runs}) > 1  # different seeds, different positions


def test_step_and_iteration_bounds_answer_at_once():
    with pytest.raises(ValueError, match=f"`num_steps` asks for {MAX_NUM_STEPS + 1}"):
        plan_budget(None, MAX_NUM_STEPS + 1, 1, 1, 1)
    with pytest.raises(ValueError, match="`budget` asks for"):
        plan_budget(MAX_BUDGET, None, 1, 1, 1)
    with pytest.raises(ValueError, match="`budget` asks for"):
        plan_budget(10**6, None, 1, 0, 0)
    with pytest.raises(ValueError, match=f"at most {MAX_FP_ITERS_PER_STEP}"):
        plan_budget(10**5, 10, 1, 1, 1)
    assert len(plan_budget(None, MAX_NUM_STEPS, 1, 1, 1)) == MAX_NUM_STEPS
