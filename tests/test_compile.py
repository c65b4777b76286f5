"""Regional compilation (`compile_repeated_blocks`): what it touches, and that compiled blocks compute what eager
blocks compute across budgets and reuse modes without new graphs (the compiling test is `slow`: inductor takes
tens of seconds on a CPU)."""

import pytest
import torch
from conftest import tiny_model


def test_compile_repeated_blocks_marks_every_block_and_keeps_the_state_dict():
    model = tiny_model()
    keys = list(model.state_dict())
    model.compile_repeated_blocks()
    blocks = [*model.model.pre_blocks, *model.model.fp_blocks, *model.model.post_blocks]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert model.model._compiled_call_impl is None  # the solver loop stays eager
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefixes: save/load unchanged


def test_compile_repeated_blocks_refuses_a_model_without_blocks():
    model = tiny_model()
    model._repeated_blocks = ["NoSuchBlock"]
    with pytest.raises(ValueError, match="_repeated_blocks"):
        model.compile_repeated_blocks()


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_compile_once_across_budgets():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = tiny_model(seed=3), tiny_model(seed=3)
    compiled.compile_repeated_blocks()
    ids = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # grad mode is part of a compiled graph's guards; generate runs without grad
        for fp_iters in (1, 3, 8):  # the budget sets the iteration count: no new graph for it
            a = eager(ids, fp_iters=fp_iters).logits
            b = compiled(ids, fp_iters=fp_iters).logits
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    # Rows that stop early run a smaller batch: dynamo's automatic dynamic shapes add one graph for that, and
    # nothing grows with the number of budgets, step counts or reuse modes after it.
    settings = [(24, "none"), (48, "3sr"), (96, "full"), (192, "3sr"), (36, "full"), (384, "none")]
    for budget, reuse in settings:
        out = compiled.generate(batch_size=2, seq_len=12, budget=budget, reuse=reuse, use_cache=True,
                                generator=torch.Generator().manual_seed(1))
        assert out.shape == (2, 12)
    assert counters["stats"]["unique_graphs"] <= 2
