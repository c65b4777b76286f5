"""Every edge input is answered: a result with no mask and no out-of-vocabulary id, or a ValueError naming the
argument. Explicit cases first, then a hypothesis suite over all generate() arguments (valid and invalid)."""

import math
import time

import pytest
import torch
from conftest import MASK, VOCAB, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from fpmgm_hf import FPMGMGenerationConfig
from fpmgm_hf.generation_config_fpmgm import ACCEPTED_NAMES, MAX_BATCH_SIZE, MAX_NEW_TOKENS
from fpmgm_hf.scheduling_fpmgm import MAX_BUDGET, MAX_FP_ITERS_PER_STEP, MAX_NUM_STEPS

MODEL = tiny_model(max_position_embeddings=16)
CLASS_MODEL = tiny_model(num_classes=3, max_position_embeddings=16)


def canvas(*rows):
    return torch.tensor(rows)


def test_no_mask_gives_the_input_back_unchanged():
    x = canvas([1, 2, 3], [4, 5, 6])
    out = MODEL.generate(x, return_dict_in_generate=True)
    assert torch.equal(out.sequences, x) and out.num_blocks == 0 and out.block_passes.tolist() == [0, 0]
    assert out.step_stats == [] and MODEL.generate(x, temperature=0).tolist() == x.tolist()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), "input_ids"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "input_ids"),
        (dict(input_ids=torch.tensor([[True, False]])), "input_ids"),
        (dict(input_ids=torch.tensor([[1.0, float(MASK)]])), "input_ids"),
        (dict(input_ids=canvas([1, VOCAB, 3])), "input_ids"),  # out of vocabulary, and no mask in the row
        (dict(input_ids=canvas([1, MASK]), attention_mask=canvas([1, 0])), "attention_mask"),  # mask in padding
        (dict(input_ids=canvas([1, MASK]), attention_mask=canvas([1, 2])), "attention_mask"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1e-320), "temperature"),
        (dict(randomness=float("inf")), "randomness"),
        (dict(generation_config="num_steps=2"), "generation_config"),
        (dict(generator=0), "generator"),
        (dict(callback="print"), "callback"),
        (dict(streamer=print), "streamer"),
        (dict(budget=10**9), "budget"),
        (dict(num_steps=10**6), "num_steps"),
        (dict(fp_iters_per_step=10**6), "fp_iters_per_step"),
        (dict(max_new_tokens=10**9), "max_new_tokens"),
        (dict(num_return_sequences=10**6), "num_return_sequences"),
        (dict(batch_size=10**9), "batch_size"),
        (dict(budget=MAX_BUDGET), "budget"),  # allowed, but would need more than MAX_NUM_STEPS steps
    ],
)
def test_edge_inputs_raise_a_value_error_naming_the_argument_at_once(kwargs, name):
    kwargs = {"input_ids": canvas([1, MASK, MASK]), **kwargs}
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"`{name}`"):
        MODEL.generate(**kwargs)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(guidance_scale=50.0), "class_labels"),  # guidance without labels is not silently unguided
        (dict(class_labels=2.9), "class_labels"),
        (dict(class_labels=[0.0, 1.0]), "class_labels"),
        (dict(class_labels=True), "class_labels"),
        (dict(class_labels=[0, 4]), "class_labels"),
        (dict(class_labels=[0, 1, 2]), "class_labels"),
        (dict(class_labels=[0, 1], guidance_scale=float("inf")), "guidance_scale"),
    ],
)
def test_class_label_and_guidance_edges(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        CLASS_MODEL.generate(batch_size=2, seq_len=4, **kwargs)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint16])
def test_integer_ids_of_any_width_give_the_same_result(dtype):
    x = canvas([1, 2, MASK, MASK, 5], [MASK, 3, MASK, MASK, MASK])
    kw = dict(num_steps=3, return_dict_in_generate=True)
    want = MODEL.generate(x, generator=torch.Generator().manual_seed(0), **kw).sequences
    got = MODEL.generate(x.to(dtype), generator=torch.Generator().manual_seed(0), **kw).sequences
    assert got.dtype == torch.long and torch.equal(got, want)


def test_all_padding_rows_are_returned_as_they_are_or_continued():
    x = canvas([1, MASK, MASK], [4, 5, 6])
    mask = canvas([1, 1, 1], [0, 0, 0])
    out = MODEL.generate(x, attention_mask=mask, num_steps=2)
    assert out[1].tolist() == [4, 5, 6] and not (out == MASK).any()
    grown = MODEL.generate(canvas([4, 5, 6]), attention_mask=canvas([0, 0, 0]), max_new_tokens=3, num_steps=2,
                           return_dict_in_generate=True)
    assert grown.sequences[0, :3].tolist() == [4, 5, 6] and grown.attention_mask[0].tolist() == [0, 0, 0, 1, 1, 1]


def test_documented_bounds_are_the_enforced_ones():
    assert (MAX_NUM_STEPS, MAX_FP_ITERS_PER_STEP, MAX_BUDGET) == (10_000, 1_000, 1_000_000)
    assert (MAX_NEW_TOKENS, MAX_BATCH_SIZE) == (1 << 20, 1 << 16)
    for name, top in (("num_steps", MAX_NUM_STEPS), ("fp_iters_per_step", MAX_FP_ITERS_PER_STEP),
                      ("budget", MAX_BUDGET), ("max_new_tokens", MAX_NEW_TOKENS)):
        FPMGMGenerationConfig(**{name: top})
        with pytest.raises(ValueError, match=f"`{name}`"):
            FPMGMGenerationConfig(**{name: top + 1})


# ----------------------------------------------------------------------------------------- hypothesis

OFTEN = st.sampled_from([True, True, True, False])  # hypothesis favours low integers: sample instead
JUNK = st.sampled_from([None, True, -1, 0, 10**9, 2.5, float("nan"), float("inf"), 1e-320, "x", [1]])
SMALL = {  # valid values that keep every example fast
    "batch_size": st.integers(1, 2),
    "seq_len": st.integers(1, 17),
    "max_new_tokens": st.integers(1, 24),
    "gen_length": st.integers(1, 8),
    "max_length": st.integers(1, 20),
    "num_return_sequences": st.integers(1, 2),
    "block_length": st.integers(1, 17),
    "num_steps": st.integers(1, 6),
    "steps": st.integers(1, 6),
    "budget": st.integers(1, 40),
    "fp_iters_per_step": st.integers(1, 4),
    "fp_schedule": st.sampled_from(["decreasing", "fixed", "increasing", "cosine", "front_loaded", "zig"]),
    "fp_tol": st.sampled_from([None, 1e-3, 0.5]),
    "sampler": st.sampled_from(["ancestral", "confidence", "gibbs"]),
    "alg": st.sampled_from([None, "maskgit_plus", "topk_margin", "entropy", "origin", "best"]),
    "alg_temp": st.sampled_from([0.0, 0.5, 3.0]),
    "remasking": st.sampled_from(["low_confidence", "random", "never"]),
    "do_sample": st.booleans(),
    "reuse": st.sampled_from(["3sr", "full", "none", "some"]),
    "gamma_mask_min": st.floats(0, 1),
    "gamma_mask_max": st.floats(0, 1),
    "gamma_changed": st.floats(0, 1),
    "temperature": st.sampled_from([0, 0.5, 1.0, 1e-4, 1e4, 1e-5]),
    "top_k": st.integers(1, 50),
    "top_p": st.floats(0, 1),
    "noise_eps": st.sampled_from([1e-3, 0.5]),
    "time_eps": st.sampled_from([0.0, 0.3]),
    "eps": st.sampled_from([0.0, 0.2]),
    "mask_schedule": st.sampled_from(["cosine", "linear", "arccos"]),
    "randomness": st.sampled_from([0.0, 1.0]),
    "order": st.sampled_from(["confidence", "halton"]),
    "guidance_scale": st.sampled_from([None, 0.0, 1.0, 3.0]),
    "use_cache": st.booleans(),
    "return_dict_in_generate": st.booleans(),
    "output_history": st.booleans(),
    "output_solver_trace": st.booleans(),
    "progress_bar": st.just(False),
    "mask_token_id": st.sampled_from([None, MASK, 5, VOCAB]),
    "pad_token_id": st.sampled_from([None, 0, 7, MASK]),
    "bos_token_id": st.sampled_from([None, 1]),
    "eos_token_id": st.sampled_from([None, 0, 3, [2, 3], []]),
}
assert set(SMALL) == set(ACCEPTED_NAMES)  # the suite covers every argument name generate() accepts


@st.composite
def input_ids(draw):
    valid = draw(OFTEN)  # most calls get a usable prompt or canvas
    kind = draw(st.sampled_from(["none", "canvas", "canvas", "prompt"] if valid else
                                ["empty", "zero", "bool", "float", "oov", "1d", "list"]))
    rows, length = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    ids = torch.randint(0, VOCAB - 1, (rows, length), generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
    if kind == "canvas":
        ids[:, draw(st.integers(0, length - 1)):] = MASK
    return {
        "none": None, "canvas": ids, "prompt": ids, "empty": ids[:0], "zero": ids[:, :0], "bool": ids > 5,
        "float": ids.float(), "oov": ids + VOCAB, "1d": ids[0], "list": ids.tolist(),
    }[kind]


@st.composite
def attention_masks(draw, ids):
    if ids is None or not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] == 0:
        return draw(st.sampled_from([None] * 7 + [torch.ones(1, 3)]))
    valid = draw(OFTEN)
    kind = draw(st.sampled_from(["none", "ones", "left", "right"] if valid else ["holes", "zeros", "shape", "twos"]))
    mask = torch.ones(ids.shape, dtype=torch.long)
    pad = draw(st.integers(0, ids.shape[1]))
    if kind == "left":
        mask[-1, :pad] = 0
    elif kind == "right":
        mask[-1, ids.shape[1] - pad:] = 0
    elif kind == "holes" and ids.shape[1] > 2:
        mask[0, 1] = 0
    return {"none": None, "zeros": mask * 0, "shape": mask[:, :-1], "twos": mask * 2}.get(kind, mask)


@st.composite
def generate_calls(draw):
    kwargs = {}
    for name in draw(st.lists(st.sampled_from(sorted(SMALL)), max_size=4, unique=True)):
        kwargs[name] = draw(SMALL[name] if draw(OFTEN) else JUNK)
    ids = draw(input_ids())
    if ids is not None:
        kwargs["input_ids"] = ids
    mask = draw(attention_masks(ids))
    if mask is not None:
        kwargs["attention_mask"] = mask
        if torch.is_tensor(ids) and mask.shape == ids.shape and draw(OFTEN):  # mostly no mask in padding
            kwargs["input_ids"] = torch.where((mask == 0) & (ids == MASK), torch.zeros_like(ids), ids)
    conditional = draw(st.sampled_from([False, True]))
    if conditional:
        kwargs["class_labels"] = draw(st.sampled_from([None, 0, 1, 2, 3, [0, 1, 2], 2.9, [4], True]))
    config = draw(st.sampled_from([None] * 12 + ["dict", "transformers", "ours", "str"]))
    if config is not None:
        kwargs["generation_config"] = {
            "dict": {"num_steps": 2}, "transformers": GenerationConfig(num_steps=3, do_sample=True),
            "ours": FPMGMGenerationConfig(sampler="confidence"), "str": "fast",
        }[config]
    return conditional, kwargs


@settings(max_examples=1000, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(generate_calls())
def test_any_arguments_give_a_clean_result_or_a_value_error(call):
    conditional, kwargs = call
    model = CLASS_MODEL if conditional else MODEL
    drafts = []

    class Streamer:
        def put(self, tokens):
            drafts.append(tokens)

        def end(self):
            pass

    try:
        out = model.generate(generator=torch.Generator().manual_seed(0), streamer=Streamer(), **kwargs)
    except ValueError as err:
        assert "`" in str(err) or "unknown" in str(err), err  # names the argument
        return
    seq = out if torch.is_tensor(out) else out.sequences
    mask_id = kwargs.get("mask_token_id") or MASK
    cfg = kwargs.get("generation_config")
    if isinstance(cfg, FPMGMGenerationConfig) and cfg.mask_token_id is not None:
        mask_id = cfg.mask_token_id
    assert seq.dtype == torch.long and seq.dim() == 2 and seq.shape[0] >= 1
    assert not (seq == mask_id).any(), (kwargs, seq)
    assert int(seq.min()) >= 0 and int(seq.max()) < VOCAB
    assert all(torch.is_tensor(d) for d in drafts) and not any(math.isnan(float(d.sum())) for d in drafts)
