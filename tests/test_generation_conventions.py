"""generate() in the ecosystem's words: max_new_tokens / padding, aliases, num_return_sequences, Dream's
diffusion_generate and algs, generation_config types, the EOS rule, BOS, blockwise decoding past the context."""

import pytest
import torch
from conftest import MASK, VOCAB, randomize_, tiny_config, tiny_model
from transformers import GenerationConfig

from fpmgm_hf import FPMGMForMaskedGeneration, FPMGMGenerationConfig

GREEDY = dict(sampler="confidence", temperature=0, num_steps=6)


def sharp_model(**overrides):
    """Larger random weights than `tiny_model`: greedy outputs depend on the context."""
    torch.manual_seed(0)
    return randomize_(FPMGMForMaskedGeneration(tiny_config(**overrides)), 0, std=0.3).eval()


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_max_new_tokens_appends_masks_after_the_prompt():
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompt, max_new_tokens=5, num_steps=3, generator=seeded(), return_dict_in_generate=True)
    assert out.sequences.shape == (2, 8) and torch.equal(out.sequences[:, :3], prompt)
    assert not (out.sequences == MASK).any() and out.attention_mask.all()
    assert model.generate(prompt).tolist() == prompt.tolist()  # nothing masked, nothing to add: unchanged
    total = model.generate(prompt, max_length=7, num_steps=3, generator=seeded())
    assert total.shape == (2, 7)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(prompt, max_length=3)
    assert model.generate(prompt, max_new_tokens=2, max_length=50, num_steps=2).shape == (2, 5)  # max_new_tokens wins


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_prompts_of_unequal_length_equal_each_prompt_alone(side):
    model = sharp_model()
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    L = max(map(len, prompts))
    ids, mask = torch.zeros(3, L, dtype=torch.long), torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        cols = slice(L - len(p), L) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = torch.tensor(p), 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
    for i, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=5, **GREEDY)[0]
        row, keep = out.sequences[i], out.attention_mask[i]
        assert row[keep].tolist() == alone.tolist(), (i, row, alone)
        pads = (~keep).nonzero().squeeze(1).tolist()
        expected_pads = list(range(L - len(p))) if side == "left" else list(range(len(p) + 5, L + 5))
        assert pads == expected_pads and (row[~keep] == 0).all()  # padding kept, on the caller's side


def test_padding_with_holes_is_refused_when_appending():
    with pytest.raises(ValueError, match="left- or right-padded"):
        tiny_model().generate(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 0, 1]]), max_new_tokens=2)


def test_steps_is_num_steps_and_conflicts_are_refused():
    model = tiny_model()
    a = model.generate(batch_size=2, seq_len=8, steps=3, generator=seeded(), return_dict_in_generate=True)
    b = model.generate(batch_size=2, seq_len=8, num_steps=3, generator=seeded(), return_dict_in_generate=True)
    assert a.num_steps == 3 and torch.equal(a.sequences, b.sequences)
    with pytest.raises(ValueError, match="conflicts with `num_steps`"):
        model.generate(batch_size=1, seq_len=4, steps=3, num_steps=4)
    assert FPMGMGenerationConfig(steps=5).num_steps == 5
    c = model.generate(torch.tensor([[1, 2]]), gen_length=4, num_steps=2, generator=seeded())  # LLaDA's name
    assert c.shape == (1, 6)


def test_num_return_sequences_repeats_each_input_row():
    model = tiny_model(num_classes=3)
    out = model.generate(torch.tensor([[1, MASK, MASK], [2, MASK, MASK]]), num_return_sequences=3,
                         class_labels=torch.tensor([0, 2]), guidance_scale=2.0, num_steps=2, generator=seeded())
    assert out.shape == (6, 3) and out[:3, 0].tolist() == [1, 1, 1] and out[3:, 0].tolist() == [2, 2, 2]
    assert len({tuple(r) for r in out[:3].tolist()}) > 1  # independent samples
    assert model.generate(batch_size=2, seq_len=4, num_return_sequences=2, num_steps=2).shape == (4, 4)


def test_diffusion_generate_speaks_dream():
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3]])
    dream = dict(steps=4, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=5, return_dict_in_generate=True,
                 output_history=True)
    out = model.diffusion_generate(prompt, alg="origin", generator=seeded(), **dream)
    ours = model.generate(prompt, sampler="ancestral", num_steps=4, temperature=0.8, top_p=0.9, top_k=20,
                          max_new_tokens=5, return_dict_in_generate=True, output_history=True, generator=seeded())
    assert torch.equal(out.sequences, ours.sequences) and len(out.history) == 4
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        got = model.diffusion_generate(inputs=prompt, alg=alg, alg_temp=0.5, generator=seeded(), **dream)
        want = model.generate(prompt, sampler="confidence", alg=alg, alg_temp=0.5, num_steps=4, temperature=0.8,
                              top_p=0.9, top_k=20, max_new_tokens=5, generator=seeded())
        assert torch.equal(got.sequences, want) and not (want == MASK).any()
    with pytest.raises(ValueError, match="unknown generate"):
        model.diffusion_generate(prompt, not_a_dream_option=1)


def test_a_user_logits_processor_sees_the_drawn_positions_and_is_obeyed():
    from transformers import LogitsProcessor, LogitsProcessorList

    class Ban(LogitsProcessor):  # a user's processor: token 5 may never be drawn
        def __init__(self):
            self.shapes = []

        def __call__(self, input_ids, scores):
            self.shapes.append((tuple(input_ids.shape), tuple(scores.shape)))
            scores[:, 5] = -float("inf")
            return scores

    ban = Ban()
    for sampler in ("ancestral", "confidence"):
        out = tiny_model().generate(batch_size=4, seq_len=12, num_steps=6, sampler=sampler, temperature=3.0,
                                    logits_processor=LogitsProcessorList([ban]), generator=seeded())
        assert not (out == 5).any() and not (out == MASK).any()
    free = tiny_model().generate(batch_size=4, seq_len=12, num_steps=6, temperature=3.0, generator=seeded())
    assert (free == 5).any()  # the ban is what removed it (hot sampling draws every token otherwise)
    assert all(ids[1] == 12 and scores[0] == ids[0] and scores[1] == VOCAB for ids, scores in ban.shapes)
    with pytest.raises(ValueError, match="logits_processor"):
        tiny_model().generate(batch_size=1, seq_len=4, logits_processor="top_k")


def test_dream_hooks_and_eps():
    model = tiny_model()
    seen = []

    def force_seven(step, x, logits):  # Dream's logits hook: (B, L, V) logits of the whole canvas
        seen.append((step, tuple(logits.shape)))
        forced = torch.full_like(logits, -float("inf"))
        forced[..., 7] = 0.0
        return forced

    out = model.diffusion_generate(torch.tensor([[1, 2]]), max_new_tokens=6, steps=3,
                                   generation_logits_hook_func=force_seven, generator=seeded())
    assert torch.equal(out[0, 2:], torch.full((6,), 7)) and [s for s, _ in seen] == [0, 1, 2]
    assert all(shape == (1, 8, VOCAB) for _, shape in seen)

    def pin_first(step, x, logits):  # Dream's tokens hook: returns the canvas to continue from
        x = x.clone()
        x[:, 2] = 3
        return x

    out = model.diffusion_generate(torch.tensor([[1, 2]]), max_new_tokens=6, steps=3,
                                   generation_tokens_hook_func=pin_first, generator=seeded())
    assert (out[:, 2] == 3).all()
    with pytest.raises(ValueError, match="generation_tokens_hook_func.*shape"):
        model.diffusion_generate(torch.tensor([[1, 2]]), max_new_tokens=6, steps=3,
                                 generation_tokens_hook_func=lambda step, x, logits: x[:, :3], generator=seeded())
    # eps: the times end at eps instead of 0, so the early steps reveal fewer tokens; everything is filled anyway
    counts = {}
    for eps in (0.0, 0.5):
        res = model.generate(batch_size=64, seq_len=16, num_steps=4, eps=eps, output_history=True,
                             return_dict_in_generate=True, generator=seeded())
        counts[eps] = int((res.history[0] != MASK).sum())
        assert not (res.sequences == MASK).any()
    assert counts[0.5] < counts[0.0]


def test_confidence_sampler_offers_every_dream_alg():
    model = sharp_model()
    outs = {alg: model.generate(batch_size=2, seq_len=10, sampler="confidence", alg=alg, num_steps=5,
                                generator=seeded(), output_history=True, return_dict_in_generate=True)
            for alg in ("maskgit_plus", "topk_margin", "entropy", "origin")}
    reveal_orders = {alg: [tuple((h != MASK)[0].tolist()) for h in o.history] for alg, o in outs.items()}
    assert len(set(map(tuple, reveal_orders.values()))) > 1
    with pytest.raises(ValueError, match="`alg`"):
        model.generate(batch_size=1, seq_len=4, sampler="ancestral", alg="entropy")
    with pytest.raises(ValueError, match="`alg`"):
        model.generate(batch_size=1, seq_len=4, alg="best")
    with pytest.raises(ValueError, match="`alg_temp`"):
        model.generate(batch_size=1, seq_len=4, sampler="ancestral", alg_temp=1.0)


def test_remasking_and_do_sample_map_to_our_fields():
    cfg = FPMGMGenerationConfig(remasking="random", do_sample=False)
    assert (cfg.sampler, cfg.alg, cfg.temperature) == ("confidence", "origin", 0.0)
    with pytest.raises(ValueError, match="remasking"):
        FPMGMGenerationConfig(remasking="sometimes")
    with pytest.raises(ValueError, match="do_sample"):
        tiny_model().generate(batch_size=1, seq_len=4, do_sample=True, temperature=0)


@pytest.mark.parametrize(
    "config",
    [GenerationConfig(num_steps=2, return_dict_in_generate=True), {"num_steps": 2, "return_dict_in_generate": True},
     FPMGMGenerationConfig(num_steps=2, return_dict_in_generate=True)],
    ids=["transformers", "dict", "ours"],
)
def test_generation_config_of_every_accepted_type_is_honoured(config):
    out = tiny_model().generate(batch_size=1, seq_len=6, generation_config=config, generator=seeded())
    assert out.num_steps == 2 and out.sequences.shape == (1, 6)


@pytest.mark.parametrize("config", ["num_steps=2", 3, [("num_steps", 2)], GenerationConfig(num_beams=4)])
def test_generation_config_of_a_wrong_type_or_field_is_refused(config):
    with pytest.raises(ValueError, match="generation_config"):
        tiny_model().generate(batch_size=1, seq_len=4, generation_config=config)


def test_eos_rule_pads_everything_after_the_first_generated_eos():
    model = tiny_model()  # its greedy token is 0 at every position
    prompt = torch.tensor([[3, 4]])
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=0, pad_token_id=7, num_steps=3, temperature=0)
    assert out.tolist() == [[3, 4, 0, 7, 7, 7, 7, 7]]
    default_pad = model.generate(prompt, max_new_tokens=3, eos_token_id=[5, 0], num_steps=3, temperature=0)
    assert default_pad.tolist() == [[3, 4, 0, 5, 5]]  # pad defaults to the first EOS id
    no_eos = model.generate(prompt, max_new_tokens=3, num_steps=3, temperature=0)
    assert no_eos.tolist() == [[3, 4, 0, 0, 0]]
    for name, value in (("eos_token_id", MASK), ("pad_token_id", VOCAB), ("eos_token_id", [])):
        with pytest.raises(ValueError, match=name):
            model.generate(prompt, max_new_tokens=2, **{name: value})


def test_eos_ends_blockwise_decoding_early():
    model = tiny_model()
    kw = dict(max_new_tokens=12, block_length=4, num_steps=2, temperature=0, return_dict_in_generate=True)
    ended = model.generate(torch.tensor([[3]]), eos_token_id=0, pad_token_id=7, **kw)
    full = model.generate(torch.tensor([[3]]), **kw)
    assert ended.sequences.tolist() == [[3, 0] + [7] * 11] and ended.num_blocks == 1
    assert full.num_blocks == 3 and ended.nfe.item() < full.nfe.item()


def test_bos_starts_a_canvas_without_prompt():
    out = tiny_model().generate(batch_size=2, max_new_tokens=4, bos_token_id=5, num_steps=2, generator=seeded())
    assert out.shape == (2, 5) and out[:, 0].tolist() == [5, 5]
    assert tiny_model().generate(batch_size=2, max_new_tokens=4, num_steps=2).shape == (2, 4)


def test_blocks_are_decoded_left_to_right_with_the_budget_per_block():
    model = tiny_model()
    history = []
    out = model.generate(torch.tensor([[1, 2]]), max_new_tokens=10, block_length=4, budget=12, num_steps=3,
                         use_cache=False, generator=seeded(), return_dict_in_generate=True,
                         callback=lambda step, canvas: history.append((step, canvas.clone())))
    assert out.num_blocks == 3 and [s["block"] for s in out.step_stats] == [0] * 3 + [1] * 3 + [2] * 3
    assert [step for step, _ in history] == list(range(9))
    for step, canvas in history:
        block = step // 3
        assert not (canvas[0, 2:2 + 4 * (block + 1)][: 4 * block] == MASK).any()  # earlier blocks are done
        assert (canvas[0, 2 + 4 * (block + 1):] == MASK).all()  # later blocks untouched
    assert 3 * 10 < out.block_passes.item() <= 3 * 12  # 12 passes per block, 3 blocks


def test_three_state_reuse_works_within_each_block():
    model = tiny_model(fp_max_iter=60)
    kw = dict(max_new_tokens=12, block_length=6, num_steps=4, fp_iters_per_step=60, fp_tol=1e-4, use_cache=False,
              sampler="confidence", temperature=0, return_dict_in_generate=True)
    none = model.generate(torch.tensor([[1, 2]]), reuse="none", **kw)
    warm = model.generate(torch.tensor([[1, 2]]), reuse="3sr", **kw)

    def later(out):  # iterations of every step but the first of its block (which starts cold either way)
        steps = out.step_stats
        same_block = lambda i: i and steps[i]["block"] == steps[i - 1]["block"]  # noqa: E731
        return sum(int(s["iterations"].sum()) for i, s in enumerate(steps) if same_block(i))

    assert later(warm) < later(none) and warm.num_blocks == 2


def test_generating_past_max_position_embeddings_slides_the_context():
    model = tiny_model(max_position_embeddings=16)
    widths = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(args[0].shape[1]),
                                          with_kwargs=True)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=40, num_steps=2, generator=seeded(),
                         return_dict_in_generate=True)
    assert out.sequences.shape == (1, 43) and not (out.sequences == MASK).any()
    assert out.num_blocks == 5 and max(widths) == 16  # blocks of 8 with 8 tokens of context
    long_prompt = torch.randint(0, MASK, (1, 30), generator=seeded())
    assert model.generate(long_prompt, max_new_tokens=4, num_steps=2).shape == (1, 34)
    with pytest.raises(ValueError, match="block_length"):
        model.generate(long_prompt, max_new_tokens=4, block_length=17)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(batch_size=1, seq_len=17)  # a canvas (no prompt to continue) must fit


def test_progress_bar_counts_every_step_of_every_block(capsys):
    model = tiny_model(max_position_embeddings=16)
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, num_steps=3, progress_bar=True, generator=seeded())
    err = capsys.readouterr().err
    assert "generate" in err and "/9" in err  # 3 blocks (of 8, with 8 tokens of context) x 3 steps
    model.generate(batch_size=1, seq_len=8, num_steps=2, generator=seeded())
    assert "generate" not in capsys.readouterr().err  # off by default
