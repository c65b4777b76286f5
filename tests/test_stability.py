"""The stability contract: the default map converges when trained from scratch, conversion starts exact at
every width, the safety net catches an expansive map, the fixed-point regularisers are what they claim."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import MASK, VOCAB, tiny_config, tiny_model

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration, WarmStart
from fpmgm_hf.conversion.layer_mapping import map_layers
from fpmgm_hf.evaluation.stability import check_contract, generation_check, solver_profile
from fpmgm_hf.solver_fpmgm import anderson, picard
from fpmgm_hf.training.objectives import mdlm_nelbo


def bigram_chain(n, length, seed=0):
    """Sequences from a sparse random bigram chain over the non-mask tokens (3 successors per token)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, MASK, (MASK, 3), generator=g)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, MASK, (n,), generator=g)
    for t in range(1, length):
        x[:, t] = successors[x[:, t - 1], torch.randint(0, 3, (n,), generator=g)]
    return x


def train_tiny(injection, steps=250, lr=1e-3):
    data = bigram_chain(1024, 32)
    torch.manual_seed(0)
    model = FPMGMForMaskedGeneration(tiny_config(injection=injection, max_position_embeddings=32))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        loss, _ = mdlm_nelbo(model, data[torch.randint(0, 960, (16,), generator=g)], generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return model.eval(), data[960:992]


def test_default_map_keeps_the_contract_where_the_paper_map_breaks_it():
    model, held_out = train_tiny("constrained")
    profile = solver_profile(model, held_out)
    generation = generation_check(model, seq_len=32, budget=768)
    assert check_contract(profile, generation) == []
    assert all(row["residual"][32] <= 1e-3 and row["growth_per_iter"] <= 1.005 for row in profile.values())
    # The same recipe with the paper's map: the contract can fail, and does.
    paper, _ = train_tiny("concat_mlp")
    failures = check_contract(solver_profile(paper, held_out), generation_check(paper, seq_len=32, budget=768))
    assert failures, "the paper's map was expected to expand at this learning rate"


def explicit_layers(teacher, x, mapping):
    """Logits of the teacher's layers `mapping` (1-based) in sequence, written out block by block."""
    from fpmgm_hf.modeling_fpmgm import rotary_tables

    m = teacher.model
    c = m.conditioning(x.shape[0], x.device, None, None)
    rope = rotary_tables(torch.arange(x.shape[1])[:, None], teacher.config.head_dim)
    h = m.embed_tokens(x)
    for layer in mapping:
        h = m.pre_blocks[layer - 1](h, c, rope, None)
    return teacher.lm_head(h, c)


@pytest.mark.parametrize("width,heads", [(64, 4), (256, 4), (768, 12)])
def test_conversion_is_exact_at_one_iteration(width, heads):
    config = tiny_config(hidden_size=width, num_attention_heads=heads, cond_dim=32, num_pre_layers=4,
                         num_fp_layers=0, num_post_layers=0)
    torch.manual_seed(0)
    teacher = FPMGMForMaskedGeneration(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial adaLN gates and head (the default init zeroes them)
        for name, p in teacher.named_parameters():
            if "adaLN" in name or "lm_head.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    x = torch.randint(0, VOCAB, (2, 12))
    x[:, ::3] = MASK
    with torch.no_grad():
        expected = explicit_layers(teacher, x, (1, 3, 4))
        exact = map_layers(teacher, (1, 3, 4)).eval()(x, fp_iters=1).logits
        paper = map_layers(teacher, (1, 3, 4), injection="concat_mlp").eval()(x, fp_iters=1).logits
    assert (exact - expected).abs().max() <= 1e-4
    assert (paper - expected).abs().max() > 1e-4  # the paper's injection is only close to the identity


# ------------------------------------------------------------------------------------------- safety net


def test_solver_safety_net_stops_an_expanding_map_at_its_best_iterate():
    z0 = torch.ones(2, 3, 4)
    f = lambda z, rows: 2.0 * z + 1.0  # noqa: E731  residual doubles at every iteration
    z, stats = picard(f, z0, max_iter=50, divergence_patience=3)
    assert stats.diverged.all() and (stats.iterations == 4).all()
    torch.testing.assert_close(z, 2.0 * z0 + 1.0)  # the first iterate had the smallest residual
    with pytest.raises(ValueError, match="divergence_patience"):
        picard(f, z0, max_iter=5, divergence_patience=0)


def test_safety_net_with_rows_stopping_at_different_times():
    # Row 0 contracts to 2 and stops by tolerance; rows 1 and 2 expand (residual doubles) from different starts:
    # they trip after 3 rises, in the row-subset phase, and come back as their own first iterates.
    def f(z, rows):
        rows = torch.arange(3) if rows is None else rows
        expand = (rows > 0).view(-1, 1, 1)
        return torch.where(expand, 2.0 * z + 1.0, 0.5 * z + 1.0)

    z0 = torch.tensor([0.0, 1.0, 5.0]).view(3, 1, 1).expand(3, 2, 4).clone()
    z, stats = picard(f, z0, max_iter=60, tol=1e-6, divergence_patience=3)
    assert stats.converged.tolist() == [True, False, False] and stats.diverged.tolist() == [False, True, True]
    torch.testing.assert_close(z[0], torch.full((2, 4), 2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[1:], 2.0 * z0[1:] + 1.0)


@pytest.mark.parametrize("solver", [picard, anderson])
def test_safety_net_never_trips_on_a_contraction(solver):
    f = lambda z, rows: 0.5 * z + 1.0  # noqa: E731
    z0 = torch.zeros(2, 3, 4, dtype=torch.float64)
    with_net, stats = solver(f, z0, max_iter=40, divergence_patience=2)
    without, _ = solver(f, z0, max_iter=40)
    assert not stats.diverged.any()
    torch.testing.assert_close(with_net, without)


def expansive_model(**overrides):
    model = FPMGMForMaskedGeneration(tiny_config(injection="concat_mlp", **overrides)).eval()
    with torch.no_grad():
        model.model.injection.fc2.weight.mul_(3.0)  # the identity injection times 3: the state triples
    return model


def test_expansive_checkpoint_samples_instead_of_crashing():
    model = expansive_model()
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        out = model(x, fp_iters=64)
    assert out.solver_stats.diverged.all() and (out.solver_stats.iterations < 64).all()
    assert torch.isfinite(out.logits).all()
    for reuse in ("full", "3sr"):
        res = model.generate(batch_size=2, seq_len=16, budget=768, reuse=reuse, return_dict_in_generate=True,
                             generator=torch.Generator().manual_seed(0))
        assert not (res.sequences == MASK).any()
        # 4 iterations per step never reach the patience of 5: the exploding warm start is what gets caught
        assert any(bool((s["diverged"] | s["cold_start"]).any()) for s in res.step_stats)
    strict = expansive_model(fp_divergence_patience=None)
    with pytest.raises(FloatingPointError):
        strict.generate(batch_size=2, seq_len=16, budget=768, reuse="full", generator=torch.Generator())


def test_exploding_or_nonfinite_warm_start_falls_back_to_h_pre():
    model = tiny_model()
    x = torch.randint(0, VOCAB, (3, 6))
    with torch.no_grad():
        cold = model(x, fp_iters=3)
        state = cold.fixed_point.clone()
        state[0] = float("nan")
        state[1] *= 1e6
        out = model(x, fp_iters=3, fixed_point_init=WarmStart(state, torch.ones(3, 6)))
    assert out.solver_stats.cold_start.tolist() == [True, True, False]
    torch.testing.assert_close(out.fixed_point[:2], cold.fixed_point[:2])
    assert cold.solver_stats.cold_start is not None and not cold.solver_stats.cold_start.any()


# ------------------------------------------------------------------------------------------ regularisers


def test_jacobian_penalty_is_the_probe_through_the_explicit_jacobian():
    model = tiny_model(fp_jacobian_reg=2.0, fp_residual_reg=0.0, fp_train_nograd_iters=(0, 0),
                       fp_train_grad_iters=(1, 1)).train()
    x = torch.randint(0, VOCAB, (1, 3))
    out = model(x, generator=torch.Generator().manual_seed(5))
    # Reference: the same probe (the generator's draws after the two S-JFB draws) through J computed densely.
    g = torch.Generator().manual_seed(5)
    torch.randint(0, 2**31 - 1, (2,), generator=g)
    with torch.no_grad():
        h_pre = model.model.pre_blocks[0](model.model.embed_tokens(x), *_cond_rope(model, x), None)
    z1 = _map(model, x, h_pre)(h_pre).detach()
    v = torch.randn(z1.shape, generator=g)
    J = torch.autograd.functional.jacobian(_map(model, x, h_pre), z1).reshape(z1.numel(), z1.numel())
    expected = 2.0 * (v.reshape(1, -1) @ J).pow(2).sum() / z1.numel()
    torch.testing.assert_close(out.fixed_point_loss, expected, rtol=1e-4, atol=1e-7)
    out.fixed_point_loss.backward()
    assert model.model.fp_blocks[0].mlp[0].weight.grad.abs().sum() > 0


def _cond_rope(model, x):
    from fpmgm_hf.modeling_fpmgm import rotary_tables

    c = model.model.conditioning(x.shape[0], x.device, None, None)
    return c, rotary_tables(torch.arange(x.shape[1])[:, None], model.config.head_dim)


def _map(model, x, h_pre):
    c, rope = _cond_rope(model, x)
    inj = model.model.injection
    A = torch.exp(-torch.exp(inj.decay_log.detach()))
    g_h = inj.proj(h_pre).detach()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(z):
        with sdpa_kernel(SDPBackend.MATH):
            return model.model.fp_blocks[0](A * z + (1 - A) * g_h, c.detach(), rope, None)

    return f


def test_residual_penalty_reaches_the_objective():
    x0 = torch.randint(0, MASK, (2, 8))
    plain = tiny_model(fp_residual_reg=0.0, fp_train_nograd_iters=(0, 0), fp_train_grad_iters=(2, 2)).train()
    reg = tiny_model(fp_residual_reg=0.5, fp_residual_reg_iters=0, fp_residual_reg_tol=0.0, fp_residual_reg_prob=1.0,
                     fp_train_nograd_iters=(0, 0), fp_train_grad_iters=(2, 2)).train()
    assert plain(x0, generator=torch.Generator().manual_seed(0)).fixed_point_loss is None
    loss_plain, _ = mdlm_nelbo(plain, x0, generator=torch.Generator().manual_seed(0))
    loss_reg, aux = mdlm_nelbo(reg, x0, generator=torch.Generator().manual_seed(0))
    penalty = aux["output"].fixed_point_loss
    assert penalty > 0
    torch.testing.assert_close(loss_reg, loss_plain + penalty)
    assert reg.eval()(x0).fixed_point_loss is None  # training only


def test_deep_hinged_residual_penalty_measures_a_later_iterate_and_spares_a_converged_map():
    from fpmgm_hf.fixed_point_fpmgm import differentiable_residual

    x0 = torch.randint(0, MASK, (2, 8))
    common = dict(fp_train_nograd_iters=(0, 0), fp_train_grad_iters=(2, 2), fp_residual_reg=1.0,
                  fp_residual_reg_prob=1.0, fp_residual_reg_tol=0.0)
    deep = tiny_model(**common, fp_residual_reg_iters=6).train()
    _, aux = mdlm_nelbo(deep, x0, generator=torch.Generator().manual_seed(0))
    # Reference: the same map by hand, 2 graph iterations from h_pre, 6 more, then one: its relative residual.
    with torch.no_grad():
        out = deep.eval()(aux["z"], timesteps=None, fp_iters=8, fp_tol=0)
        z8 = out.fixed_point
        z9 = deep(aux["z"], fp_iters=9, fp_tol=0).fixed_point
    expected = differentiable_residual(z9, z8, None)
    torch.testing.assert_close(aux["output"].fixed_point_loss, expected, rtol=1e-4, atol=1e-6)
    # The hinge: a tolerance above the deep residual asks nothing (no penalty, no gradient).
    hinged = tiny_model(**{**common, "fp_residual_reg_tol": float(expected) * 2}, fp_residual_reg_iters=6).train()
    _, aux = mdlm_nelbo(hinged, x0, generator=torch.Generator().manual_seed(0))
    assert float(aux["output"].fixed_point_loss) == 0.0
    shallow = tiny_model(**common, fp_residual_reg_iters=0).train()  # the last graph iteration: a larger residual
    _, aux_shallow = mdlm_nelbo(shallow, x0, generator=torch.Generator().manual_seed(0))
    assert float(aux_shallow["output"].fixed_point_loss) > float(expected)
    never = tiny_model(**{**common, "fp_residual_reg_prob": 1e-9}).train()  # paid on (almost) no step
    assert never(x0, generator=torch.Generator().manual_seed(0)).fixed_point_loss is None


def test_config_rejects_bad_stability_fields():
    with pytest.raises(ValueError, match="fp_decay_init"):
        FPMGMConfig(fp_decay_init=1.0)
    with pytest.raises(ValueError, match="fp_divergence_patience"):
        FPMGMConfig(fp_divergence_patience=0)
    with pytest.raises(ValueError, match="fp_jacobian_reg_prob"):
        FPMGMConfig(fp_jacobian_reg_prob=0.0)
    for name, value in (("fp_residual_reg_iters", -1), ("fp_residual_reg_tol", -0.1), ("fp_residual_reg_prob", 0.0),
                        ("fp_residual_reg_iters", 10**6)):
        with pytest.raises(ValueError, match=name):
            FPMGMConfig(**{name: value})
    with pytest.raises(ValueError, match="injection"):
        FPMGMConfig(injection="parcae")


# -------------------------------------------------------------------------------------------- harness


def test_ablation_harness_toy_run(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import fp_stability

    argv = ["--steps", "4", "--convert-steps", "2", "--hidden", "32", "--seq-len", "16", "--batch", "4",
            "--eval-blocks", "2", "--val-batches", "1", "--speed-repeats", "1", "--threads", "1",
            "--max-chars", "20000", "--variants", "paper", "converted:constrained", "--out", str(tmp_path / "o"),
            "--docs", str(tmp_path / "d")]
    results = fp_stability.main(argv)
    assert [r["variant"] for r in results] == ["paper", "converted:constrained"]
    assert results[1]["one_iteration_gap"] <= 1e-4
    readme = (tmp_path / "d" / "README.md").read_text()
    assert "concat_mlp, no norm" in readme and "Conversion starts exact" in readme
    again = fp_stability.main(argv)  # resumes: finished variants are read back, not retrained
    assert [(r["variant"], r["val_nelbo"], r["sec_per_step"]) for r in again] == [
        (r["variant"], r["val_nelbo"], r["sec_per_step"]) for r in results]
    (tmp_path / "o" / "paper.json").unlink()  # measured again from the saved model, not retrained
    remeasured = fp_stability.main(argv)
    assert remeasured[0]["sec_per_step"] == results[0]["sec_per_step"]
    assert remeasured[0]["val_nelbo"] == pytest.approx(results[0]["val_nelbo"], rel=1e-5)


def test_residual_penalty_has_finite_gradients_at_an_exact_fixed_point():
    # A fresh model's gates are zero: the map is the identity at h_pre and the residual is exactly 0 there.
    model = FPMGMForMaskedGeneration(tiny_config(fp_residual_reg=1.0)).train()
    loss, _ = mdlm_nelbo(model, torch.randint(0, MASK, (2, 8)), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_contract_cli_passes_a_contraction_and_fails_an_expanding_map(tmp_path, capsys):
    import json

    from fpmgm_hf.data import train_char_tokenizer
    from fpmgm_hf.evaluation.stability import main

    text = tmp_path / "corpus.txt"
    text.write_text("to be or not to be, that is the question.\n" * 200)
    verdicts = {}
    for name, injection, gain in (("calm", "constrained", 1.0), ("wild", "concat_mlp", 3.0)):
        folder = tmp_path / name
        tok = train_char_tokenizer([text.read_text()], str(folder))
        torch.manual_seed(0)
        model = FPMGMForMaskedGeneration(tiny_config(injection=injection, vocab_size=len(tok),
                                                     mask_token_id=tok.mask_token_id, max_position_embeddings=16))
        with torch.no_grad():
            for p in model.model.fp_blocks.parameters():
                p.mul_(0.1 if name == "calm" else 1.0)  # a small block: a contraction around h_pre
            if name == "wild":
                model.model.injection.fc2.weight.mul_(gain)
        model.save_pretrained(folder)
        code = main([str(folder), "--data", str(text), "--blocks", "4", "--budget", "24",
                     "--json", str(tmp_path / f"{name}.json")])
        verdicts[name] = (code, json.loads((tmp_path / f"{name}.json").read_text()))
    code, calm = verdicts["calm"]
    assert code == 0 and calm["failures"] == [] and set(calm["profile"]) == {"0.15", "0.5", "0.9"}
    code, wild = verdicts["wild"]
    assert code == 1 and any("growth" in f or "residual" in f for f in wild["failures"])
    assert "contract FAILS" in capsys.readouterr().out
