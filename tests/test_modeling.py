"""FPMGM model: parity with explicit compositions, S-JFB, padding, conditioning, save/load."""

import pytest
import torch
from conftest import MASK, VOCAB, tiny_config, tiny_model

from fpmgm_hf import FPMGMForMaskedGeneration, WarmStart
from fpmgm_hf.modeling_fpmgm import rotary_tables


def explicit_parts(model, x, class_labels=None):
    """h_pre, conditioning and rotary tables computed by hand from the model's own blocks."""
    m = model.model
    c = m.conditioning(x.shape[0], x.device, None, class_labels)
    rope = rotary_tables(torch.arange(x.shape[1])[:, None], model.config.head_dim)
    h = m.embed_tokens(x)
    for block in m.pre_blocks:
        h = block(h, c, rope, None)
    return h, c, rope


def explicit_head(model, z, c, rope):
    for block in model.model.post_blocks:
        z = block(z, c, rope, None)
    return model.lm_head(z, c)


def explicit_injection(inj, z, h_pre):
    """The injections written out from their definitions."""
    if inj.kind == "concat_mlp":  # fc2(GELU(fc1([z, G(h_pre)])))
        return inj.fc2(inj.act(inj.fc1(torch.cat([z, inj.proj(h_pre)], dim=-1))))
    A = torch.exp(-torch.exp(inj.decay_log))  # constrained: A z + (1 - A) G(h_pre)
    return A * z + (1 - A) * inj.proj(h_pre)


@pytest.mark.parametrize("injection", ["constrained", "concat_mlp"])
@pytest.mark.parametrize("state_norm", [False, True])
def test_k_picard_iterations_equal_an_explicit_loop(state_norm, injection):
    model = tiny_model(fp_state_norm=state_norm, injection=injection)
    x = torch.randint(0, VOCAB, (2, 9))
    K = 5
    with torch.no_grad():
        h_pre, c, rope = explicit_parts(model, x)
        inj = model.model.injection
        z = h_pre
        for _ in range(K):
            if state_norm:
                w = model.model.fp_norm.weight
                z = torch.nn.functional.layer_norm(z, (z.shape[-1],), w, None, 1e-5)
            z = model.model.fp_blocks[0](explicit_injection(inj, z, h_pre), c, rope, None)
        expected = explicit_head(model, z, c, rope)
        out = model(x, fp_iters=K)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.fixed_point, z)
    assert out.block_passes.tolist() == [1 + K + 1] * 2
    assert out.solver_stats.iterations.tolist() == [K, K]


@pytest.mark.parametrize("state_norm", [False, True])
def test_state_norm_keeps_an_expanding_map_bounded(state_norm):
    config = tiny_config(injection="concat_mlp", fp_state_norm=state_norm, fp_divergence_patience=None)
    model = FPMGMForMaskedGeneration(config).eval()  # identity injection
    with torch.no_grad():
        model.model.injection.fc2.weight.mul_(3.0)  # the map now inflates the state at every iteration
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        norms = [model(x, fp_iters=k).fixed_point.norm(dim=-1).mean().item() for k in (4, 40)]
    if state_norm:
        assert norms[1] < 2 * norms[0]
        assert "model.fp_norm.weight" in model.state_dict()
    else:
        assert norms[1] > 1e6 * norms[0]
        assert not any("fp_norm" in k for k in model.state_dict())


def test_plain_stack_equals_explicit_blocks():
    model = tiny_model(num_pre_layers=3, num_fp_layers=0, num_post_layers=2)
    assert model.model.injection is None and len(model.model.fp_blocks) == 0
    x = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        h, c, rope = explicit_parts(model, x)
        expected = explicit_head(model, h, c, rope)
        out = model(x)
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-6)
    assert out.block_passes.tolist() == [5, 5]


def test_concat_mlp_injection_starts_as_identity_in_z():
    model = FPMGMForMaskedGeneration(tiny_config(injection="concat_mlp"))
    inj = model.model.injection
    z, h = torch.randn(2, 5, 32), torch.zeros(2, 5, 32)
    inj.proj.bias.data.zero_()
    torch.testing.assert_close(inj.fc2(inj.act(inj.fc1(torch.cat([z, inj.proj(h)], -1)))), z, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inj(z, inj.prepare(h)), z, atol=1e-6, rtol=1e-6)


def grads_of(model, x, **kw):
    model.zero_grad()
    out = model(x, **kw)
    out.logits.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("injection", ["constrained", "concat_mlp"])
def test_sjfb_gradients_flow_only_through_graph_iterations(injection):
    model = tiny_model(fp_train_nograd_iters=(3, 3), fp_train_grad_iters=(2, 2), injection=injection).train()
    x = torch.randint(0, VOCAB, (2, 8))
    got = grads_of(model, x, generator=torch.Generator().manual_seed(0))

    # Independent reference: 3 iterations without a graph from a detached start, then 2 with one.
    model.zero_grad()
    h_pre, c, rope = explicit_parts(model, x)
    inj = model.model.injection
    step = lambda z: model.model.fp_blocks[0](explicit_injection(inj, z, h_pre), c, rope, None)  # noqa: E731
    with torch.no_grad():
        z = h_pre
        for _ in range(3):
            z = step(z)
    for _ in range(2):
        z = step(z)
    explicit_head(model, z, c, rope).pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def graph_size(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return len(seen)


def test_sjfb_graph_does_not_grow_with_nograd_iterations():
    x = torch.randint(0, VOCAB, (2, 8))
    sizes = []
    for n in (1, 4, 12):
        model = tiny_model(fp_train_nograd_iters=(n, n), fp_train_grad_iters=(2, 2)).train()
        sizes.append(graph_size(model(x, generator=torch.Generator().manual_seed(0)).logits))
    assert sizes[0] == sizes[1] == sizes[2]
    model = tiny_model(fp_train_nograd_iters=(1, 1), fp_train_grad_iters=(4, 4)).train()
    assert graph_size(model(x, generator=torch.Generator().manual_seed(0)).logits) > sizes[0]


def test_sjfb_draws_come_from_the_generator():
    model = tiny_model(fp_train_nograd_iters=(0, 4), fp_train_grad_iters=(3, 6)).train()
    x = torch.randint(0, VOCAB, (1, 6))
    draws = [model(x, generator=torch.Generator().manual_seed(s)).solver_stats.iterations.item() for s in range(8)]
    again = [model(x, generator=torch.Generator().manual_seed(s)).solver_stats.iterations.item() for s in range(8)]
    assert draws == again and all(3 <= d <= 10 for d in draws) and len(set(draws)) > 1


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(fp_train_nograd_iters=(1, 1), fp_train_grad_iters=(2, 2)).train()
    x = torch.randint(0, VOCAB, (2, 8))
    plain = grads_of(model, x, generator=torch.Generator().manual_seed(0))
    model.activation_checkpointing_enable()
    assert model.model.fp_blocks[0].gradient_checkpointing
    ckpt = grads_of(model, x, generator=torch.Generator().manual_seed(0))
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_padding_does_not_change_real_positions(solver):
    model = tiny_model(fp_solver=solver)
    x = torch.randint(0, VOCAB, (2, 6))
    padded = torch.cat([x, torch.full((2, 4), MASK)], dim=1)
    mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 4)], dim=1).long()
    with torch.no_grad():
        a = model(x, fp_iters=6).logits
        b = model(padded, attention_mask=mask, fp_iters=6).logits
    torch.testing.assert_close(b[:, :6], a, atol=1e-5, rtol=1e-4)


def test_eval_tolerance_stops_each_sample_and_reports_it():
    model = tiny_model(fp_max_iter=50)
    x = torch.randint(0, VOCAB, (3, 6))
    with torch.no_grad():
        out = model(x, fp_tol=1e-3)
    stats = out.solver_stats
    assert stats.converged.all() and (stats.iterations < 50).all() and (stats.residual < 1e-3).all()
    assert out.block_passes.tolist() == (2 + stats.iterations).tolist()
    with torch.no_grad():
        full = model(x, fp_tol=0)
    assert (full.solver_stats.iterations == 50).all()


def test_warm_start_mixes_previous_state_and_h_pre():
    model = tiny_model()
    x = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        base = model(x, fp_iters=0)  # zero iterations: z* is the initial state itself
        prev = torch.randn_like(base.fixed_point)
        gamma = torch.rand(2, 5)
        out = model(x, fp_iters=0, fixed_point_init=WarmStart(prev, gamma))
        full = model(x, fp_iters=0, fixed_point_init=prev)
    expected = gamma[..., None] * prev + (1 - gamma[..., None]) * base.pre_fixed_point
    torch.testing.assert_close(out.fixed_point, expected)
    torch.testing.assert_close(full.fixed_point, prev)


def test_class_conditioning_uses_the_null_class_by_default():
    model = tiny_model(num_classes=3)
    x = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        null = model(x, class_labels=torch.tensor([3, 3])).logits
        default = model(x).logits
        cond = model(x, class_labels=torch.tensor([0, 1])).logits
    torch.testing.assert_close(default, null)
    assert not torch.allclose(cond, null)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, class_labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_model()(x, class_labels=torch.tensor([0, 1]))


def test_rope_2d_uses_rows_and_columns():
    cos, sin = rotary_tables(torch.tensor([[0, 0], [0, 1], [1, 0]]), head_dim=8)
    assert cos.shape == (3, 8)
    # Moving one column changes only the column half of the table; one row only the row half.
    assert torch.equal(cos[1, :4], cos[0, :4]) and not torch.equal(cos[1, 4:], cos[0, 4:])
    assert torch.equal(cos[2, 4:], cos[0, 4:]) and not torch.equal(cos[2, :4], cos[0, :4])
    model = tiny_model(position_encoding="rope_2d", grid_size=(3, 4), max_position_embeddings=12)
    assert model(torch.randint(0, VOCAB, (1, 12))).logits.shape == (1, 12, VOCAB)


def test_bad_inputs_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="timesteps"):
        tiny_model(time_conditioning=True)(torch.zeros(1, 4, dtype=torch.long))


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.generation_config.reuse = "full"
    model.save_pretrained(tmp_path)
    loaded = FPMGMForMaskedGeneration.from_pretrained(tmp_path).eval()
    x = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.generation_config.reuse == "full"
    for name in (
        "configuration_fpmgm.py",
        "modeling_fpmgm.py",
        "solver_fpmgm.py",
        "generation_fpmgm.py",
        "scheduling_fpmgm.py",
        "validation_fpmgm.py",
        "model.safetensors",
        "generation_config.json",
    ):
        assert (tmp_path / name).exists(), name


def test_tied_embeddings_share_storage():
    model = FPMGMForMaskedGeneration(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.linear.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = FPMGMForMaskedGeneration(tiny_config())
    assert untied.lm_head.linear.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_mdlm_small_parameter_count_matches_upstream():
    """169,627,218 is the parameter count of kuleshov-group/mdlm-owt (12 DDiT blocks, 768 wide)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from param_count import count

    assert count(num_pre_layers=12, num_fp_layers=0, num_post_layers=0) == 169_627_218
    assert count(num_pre_layers=1, num_fp_layers=1, num_post_layers=1, injection="concat_mlp") == 104_659_794
    # constrained: one D x D projection (+ bias) and a per-channel decay on top of the three blocks
    assert count(num_pre_layers=1, num_fp_layers=1, num_post_layers=1) == 104_659_794 - (
        (2 * 768) * (2 * 768) + 2 * 768 + (2 * 768) * 768 + 768) + 768
