"""model.generate: budgets, 3SR, cache, determinism, invariants, batching, config round trips, errors."""

import pytest
import torch
from conftest import MASK, tiny_model

from fpmgm_hf import FPMGMGenerationConfig


def gen(model, seed=0, **kw):
    return model.generate(generator=torch.Generator().manual_seed(seed), return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
@pytest.mark.parametrize("reuse", ["3sr", "full", "none"])
def test_monotone_invariants_and_no_mask_left(sampler, reuse):
    model = tiny_model()
    canvas = torch.randint(0, MASK, (3, 12))
    canvas[:, 2:9] = MASK  # prompt + infill span + suffix
    history = []
    out = gen(
        model,
        input_ids=canvas,
        num_steps=5,
        sampler=sampler,
        reuse=reuse,
        output_history=True,
        callback=lambda step, c: history.append(c.clone()),
    )
    seq = out.sequences
    assert (seq != MASK).all()
    fixed = canvas != MASK
    assert torch.equal(seq[fixed], canvas[fixed])
    for before, after in zip([canvas] + history[:-1], history, strict=True):  # revealed tokens never change
        revealed = before != MASK
        assert torch.equal(after[revealed], before[revealed])
    assert len(out.history) == 5 and torch.equal(out.history[-1], seq)


def test_same_seed_same_output_and_different_seed_differs():
    model = tiny_model()
    a = gen(model, seed=1, batch_size=2, seq_len=10, num_steps=4).sequences
    b = gen(model, seed=1, batch_size=2, seq_len=10, num_steps=4).sequences
    c = gen(model, seed=2, batch_size=2, seq_len=10, num_steps=4).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cached_and_uncached_ancestral_sampling_agree_and_cache_saves_passes():
    model = tiny_model()
    kw = dict(batch_size=3, seq_len=8, num_steps=40, sampler="ancestral", reuse="none")
    cached = gen(model, use_cache=True, **kw)
    uncached = gen(model, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert (cached.nfe < uncached.nfe).all()  # 40 steps for 8 tokens: many steps reveal nothing
    assert (cached.block_passes < uncached.block_passes).all()


@pytest.mark.parametrize("schedule", ["decreasing", "fixed", "increasing", "cosine", "front_loaded"])
def test_budget_is_never_exceeded(schedule):
    model = tiny_model()
    out = gen(model, batch_size=2, seq_len=8, budget=50, num_steps=6, fp_schedule=schedule, use_cache=False)
    assert (out.block_passes <= 50).all() and (out.block_passes >= 48).all()
    assert out.num_steps == 6 and sum(s["fp_iters"] + 2 for s in out.step_stats) <= 50


def test_plain_stack_budget_counts_layers_times_steps():
    model = tiny_model(num_pre_layers=4, num_fp_layers=0, num_post_layers=0)
    out = gen(model, batch_size=1, seq_len=8, budget=32, use_cache=False)
    # 8 steps of 4 blocks; a step after the last mask was filled costs nothing
    assert out.num_steps == 8 and out.block_passes.item() == 4 * out.nfe.item() <= 32


def test_adaptive_stopping_saves_passes_and_reports_them():
    model = tiny_model(fp_max_iter=30)
    full = gen(model, batch_size=2, seq_len=8, num_steps=4, fp_iters_per_step=30, use_cache=False, reuse="full")
    tol = gen(
        model, batch_size=2, seq_len=8, num_steps=4, fp_iters_per_step=30, use_cache=False, reuse="full", fp_tol=1e-3
    )
    assert (tol.block_passes < full.block_passes).all()
    assert all((s["iterations"] <= 30).all() for s in tol.step_stats)


def test_warm_start_lowers_the_initial_residual():
    """With full reuse the solver starts next to the previous z*: fewer iterations to the same tolerance."""
    model = tiny_model(fp_max_iter=60)
    kw = dict(
        batch_size=2,
        seq_len=10,
        num_steps=6,
        fp_iters_per_step=60,
        fp_tol=1e-4,
        use_cache=False,
        sampler="confidence",
        temperature=0,
    )
    none = gen(model, reuse="none", **kw)
    full = gen(model, reuse="full", **kw)
    later = lambda out: sum(int(s["iterations"].sum()) for s in out.step_stats[1:])  # noqa: E731
    assert later(full) < later(none)


def test_batched_greedy_unequal_prompts_equal_rows_alone():
    model = tiny_model()
    kw = dict(sampler="confidence", temperature=0, randomness=0, num_steps=4, reuse="3sr")
    rows = [torch.tensor([3, 4, MASK, MASK, MASK, 5]), torch.tensor([7, MASK, MASK, MASK, MASK, MASK, MASK, MASK, 2])]
    L = max(len(r) for r in rows)
    batch = torch.full((2, L), 0)
    mask = torch.zeros(2, L, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, : len(r)], mask[i, : len(r)] = r, 1
    together = model.generate(input_ids=batch, attention_mask=mask, **kw)
    for i, r in enumerate(rows):
        alone = model.generate(input_ids=r[None], **kw)
        assert torch.equal(together[i, : len(r)], alone[0]), i
        assert (together[i, len(r) :] == 0).all()  # padding untouched


def test_classifier_free_guidance_scale_one_equals_conditional():
    model = tiny_model(num_classes=3)
    with torch.no_grad():
        model.model.conditioning.class_embed.weight.mul_(40)  # make the class matter
    kw = dict(batch_size=2, seq_len=6, num_steps=3, class_labels=torch.tensor([0, 2]), reuse="none")
    cond = gen(model, **kw).sequences
    guided = gen(model, guidance_scale=1.0, **kw).sequences
    assert torch.equal(cond, guided)
    assert not torch.equal(gen(model, guidance_scale=4.0, **kw).sequences, cond)


def test_streamer_receives_every_canvas():
    class Streamer:
        def __init__(self):
            self.drafts, self.ended = [], False

        def put_draft(self, canvas):
            self.drafts.append(canvas)

        def end(self):
            self.ended = True

    s = Streamer()
    tiny_model().generate(batch_size=1, seq_len=5, num_steps=3, streamer=s, generator=torch.Generator().manual_seed(0))
    assert len(s.drafts) == 3 and s.ended


def test_generation_config_round_trip_and_per_call_override(tmp_path):
    cfg = FPMGMGenerationConfig(sampler="confidence", budget=96, top_k=50, reuse="none", gamma_changed=0.3)
    cfg.save_pretrained(tmp_path)
    back = FPMGMGenerationConfig.from_pretrained(tmp_path)
    for key in ("sampler", "budget", "top_k", "reuse", "gamma_changed"):
        assert getattr(back, key) == getattr(cfg, key), key
    model = tiny_model()
    model.generation_config = back
    out = gen(model, batch_size=1, seq_len=6, budget=None, num_steps=2, reuse="full")
    assert out.num_steps == 2 and model.generation_config.reuse == "none"  # call overrides don't stick


BAD_CALLS = [
    (dict(budget=5, num_steps=4), "budget"),
    (dict(sampler="gibbs"), "sampler"),
    (dict(reuse="some"), "reuse"),
    (dict(fp_schedule="zigzag"), "fp_schedule"),
    (dict(seq_len=65), "max_position_embeddings"),
    (dict(guidance_scale=2.0), "guidance_scale"),
    (dict(temperature=-1), "temperature"),
    (dict(gamma_mask_min=0.95), "gamma_mask_min"),
    (dict(stepz=4), "unknown"),  # `steps` is an alias of num_steps (test_generation_conventions.py)
]


@pytest.mark.parametrize("kwargs,name", BAD_CALLS)
def test_bad_generate_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny_model().generate(**{"batch_size": 1, "seq_len": 6, **kwargs})


def test_model_without_mask_token_is_refused():
    model = tiny_model()
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match="mask_token_id"):
        model.generate(batch_size=1, seq_len=4)


def test_generate_from_a_model_in_training_mode_follows_the_plan_and_restores_the_mode():
    model = tiny_model().train()
    out = gen(model, batch_size=1, seq_len=6, num_steps=3, fp_iters_per_step=2, use_cache=False)
    assert all(s["iterations"].tolist() == [2] for s in out.step_stats if s["ran"].any())
    assert model.training


def test_solver_trace_per_step():
    out = gen(tiny_model(), batch_size=2, seq_len=6, num_steps=2, fp_iters_per_step=3, output_solver_trace=True,
              use_cache=False)
    assert out.step_stats[0]["trace"].shape == (2, 3) and torch.isfinite(out.step_stats[0]["trace"]).all()
