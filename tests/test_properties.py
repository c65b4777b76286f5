"""Property-based checks: any config value or generate argument either works or raises a clear ValueError."""

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpmgm_hf import FPMGMConfig, FPMGMGenerationConfig

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.floats(-2, 2),
    st.just(float("nan")),
    st.sampled_from(["picard", "anderson", "concat_mlp", "add", "none", "rope_2d", "x"]),
    st.tuples(st.integers(-1, 8), st.integers(-1, 8)),
)
CONFIG_FIELDS = [
    "vocab_size",
    "mask_token_id",
    "hidden_size",
    "num_attention_heads",
    "mlp_ratio",
    "cond_dim",
    "max_position_embeddings",
    "dropout",
    "time_conditioning",
    "num_classes",
    "num_pre_layers",
    "num_fp_layers",
    "num_post_layers",
    "injection",
    "fp_state_norm",
    "fp_solver",
    "fp_max_iter",
    "fp_tol",
    "fp_train_nograd_iters",
    "fp_train_grad_iters",
    "anderson_memory",
    "anderson_beta",
    "position_encoding",
    "grid_size",
]
GEN_FIELDS = [
    "num_steps",
    "budget",
    "fp_iters_per_step",
    "fp_schedule",
    "fp_tol",
    "sampler",
    "reuse",
    "gamma_mask_min",
    "gamma_mask_max",
    "gamma_changed",
    "temperature",
    "top_k",
    "top_p",
    "randomness",
    "order",
    "mask_schedule",
    "use_cache",
    "seq_len",
    "batch_size",
]
GEN_VALUES = st.one_of(
    VALUES,
    st.sampled_from(
        ["decreasing", "fixed", "cosine", "ancestral", "confidence", "3sr", "full", "halton", "linear", "arccos"]
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(CONFIG_FIELDS), VALUES, max_size=3))
def test_config_values_build_or_raise_value_error(kwargs):
    try:
        FPMGMConfig(**kwargs)
    except ValueError as err:
        assert "`" in str(err)  # names the field


MODEL = tiny_model()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(GEN_FIELDS), GEN_VALUES, max_size=3))
def test_generate_arguments_work_or_raise_value_error(kwargs):
    kwargs.setdefault("seq_len", 6)
    if isinstance(kwargs.get("seq_len"), int) and not isinstance(kwargs["seq_len"], bool):
        kwargs["seq_len"] = min(kwargs["seq_len"], 12)
    if isinstance(kwargs.get("batch_size"), int) and not isinstance(kwargs["batch_size"], bool):
        kwargs["batch_size"] = min(kwargs["batch_size"], 2)
    for key in ("num_steps", "budget", "fp_iters_per_step"):  # keep each example fast
        if isinstance(kwargs.get(key), int) and not isinstance(kwargs[key], bool):
            kwargs[key] = min(kwargs[key], 24)
    try:
        out = MODEL.generate(generator=torch.Generator().manual_seed(0), **kwargs)
    except ValueError as err:
        assert "`" in str(err) or "unknown" in str(err)
        return
    assert not (out == MODEL.config.mask_token_id).any()


@pytest.mark.parametrize("field", ["sampler", "reuse", "budget", "temperature"])
def test_generation_config_validation_names_the_field(field):
    with pytest.raises(ValueError, match=field):
        FPMGMGenerationConfig(**{field: "nonsense"})


@pytest.mark.parametrize("field", ["temperature", "randomness", "fp_tol", "top_p", "guidance_scale", "gamma_changed"])
def test_nan_is_rejected(field):
    with pytest.raises(ValueError, match=field):
        FPMGMGenerationConfig(**{field: float("nan")})
