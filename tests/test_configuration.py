"""FPMGMConfig: defaults, validation, serialisation."""

import pytest

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration


def test_defaults_match_the_public_contract():
    c = FPMGMConfig()
    assert (c.vocab_size, c.mask_token_id, c.hidden_size, c.num_attention_heads, c.cond_dim) == (
        50258,
        50257,
        768,
        12,
        128,
    )
    assert (c.num_pre_layers, c.num_fp_layers, c.num_post_layers) == (1, 1, 1)
    assert c.injection == "constrained" and c.fp_solver == "picard" and c.fp_tol is None
    assert c.fp_decay_init == 0.5 and c.fp_divergence_patience == 5
    assert c.fp_jacobian_reg == 0.0 and c.fp_residual_reg == 1.0 and c.fp_state_norm is False
    assert c.fp_residual_reg_iters == 12 and c.fp_residual_reg_tol == 2e-3 and c.fp_residual_reg_prob == 0.5
    assert c.fp_train_nograd_iters == (0, 4) and c.fp_train_grad_iters == (3, 6)
    assert c.time_conditioning is False and c.tie_word_embeddings is False and c.num_classes == 0
    assert c.block_passes(4) == 1 + 4 + 1


def test_round_trip(tmp_path):
    c = FPMGMConfig(
        vocab_size=11,
        mask_token_id=10,
        hidden_size=16,
        num_attention_heads=2,
        fp_tol=1e-3,
        fp_train_grad_iters=[2, 3],
        position_encoding="rope_2d",
        grid_size=[2, 3],
        max_position_embeddings=6,
    )
    c.save_pretrained(tmp_path)
    d = FPMGMConfig.from_pretrained(tmp_path)
    assert d.fp_train_grad_iters == (2, 3) and d.grid_size == (2, 3) and d.fp_tol == 1e-3
    assert d.to_dict() == c.to_dict()


BAD = [
    ("vocab_size", 0),
    ("mask_token_id", 50258),
    ("hidden_size", -1),
    ("num_attention_heads", 7),
    ("mlp_ratio", 0),
    ("cond_dim", 0),
    ("max_position_embeddings", 0),
    ("dropout", 1.0),
    ("dropout", "x"),
    ("time_conditioning", "yes"),
    ("num_classes", -1),
    ("tie_word_embeddings", 1),
    ("fp_state_norm", "yes"),
    ("num_fp_layers", -1),
    ("injection", "concat"),
    ("fp_solver", "broyden"),
    ("fp_max_iter", 0),
    ("fp_tol", 0.0),
    ("fp_tol", True),
    ("fp_train_nograd_iters", (3, 1)),
    ("fp_train_grad_iters", (0, 2)),
    ("fp_train_grad_iters", 4),
    ("anderson_memory", 0),
    ("anderson_beta", 0.0),
    ("anderson_lam", -1.0),
    ("position_encoding", "alibi"),
    ("grid_size", (0, 4)),
    ("initializer_range", 0),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        FPMGMConfig(**{field: value})


def test_cross_field_checks():
    with pytest.raises(ValueError, match="grid_size"):
        FPMGMConfig(position_encoding="rope_2d")
    with pytest.raises(ValueError, match="grid_size"):
        FPMGMConfig(position_encoding="rope_2d", grid_size=(40, 40))
    with pytest.raises(ValueError, match="at least one block"):
        FPMGMConfig(num_pre_layers=0, num_fp_layers=0, num_post_layers=0)


def test_sizes_that_could_not_be_built_are_refused_by_field():
    from fpmgm_hf.configuration_fpmgm import LIMITS

    for field, value in (("num_pre_layers", 10**6), ("num_fp_layers", 100_000), ("fp_max_iter", 10**9),
                         ("vocab_size", 10**9), ("max_position_embeddings", 10**9), ("hidden_size", 10**6)):
        with pytest.raises(ValueError, match=f"`{field}`"):
            FPMGMConfig(**{field: value})
    with pytest.raises(ValueError, match="fp_train_grad_iters"):
        FPMGMConfig(fp_train_grad_iters=(1, 10**6))
    with pytest.raises(ValueError, match="parameters"):  # each size allowed, together far too many
        FPMGMConfig(hidden_size=LIMITS["hidden_size"], num_attention_heads=64, vocab_size=LIMITS["vocab_size"],
                    num_pre_layers=LIMITS["num_pre_layers"])
    config = FPMGMConfig()
    small_cfg = dict(hidden_size=64, num_attention_heads=4, vocab_size=500, mask_token_id=499, cond_dim=32)
    real = sum(p.numel() for p in FPMGMForMaskedGeneration(FPMGMConfig(**small_cfg)).parameters())
    small = FPMGMConfig(**small_cfg).estimated_parameters
    assert abs(small - real) / real < 0.05 and config.estimated_parameters > 9e7
