"""Model-free canvas handling: input checks, padding sides, blocks and windows, the EOS rule, the streamer feed."""

import pytest
import torch

from fpmgm_hf.canvas_fpmgm import (
    append_masks,
    apply_eos,
    check_attention_mask,
    check_token_ids,
    eos_reached,
    first_masked_column,
    pack,
    padding_side,
    plan_blocks,
)
from fpmgm_hf.streaming_fpmgm import StreamEmitter

M = 9


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64]
)
def test_integer_ids_of_any_width_become_long(dtype):
    ids = check_token_ids(torch.tensor([[1, 2, M]], dtype=dtype), "input_ids", 10)
    assert ids.dtype == torch.long and ids.tolist() == [[1, 2, M]]
    assert check_token_ids([[1, 2]], "input_ids", 10).tolist() == [[1, 2]]  # nested lists too


@pytest.mark.parametrize(
    "ids,match",
    [
        (torch.tensor([[True, False]]), "dtype torch.bool"),
        (torch.tensor([[1.0, 2.0]]), "dtype torch.float32"),
        (torch.tensor([1, 2]), r"shape \(batch, length\)"),
        (torch.zeros(0, 3, dtype=torch.long), "empty batch"),
        (torch.tensor([[1, 10]]), r"\[0, 10\)"),
        (torch.tensor([[-1, 2]]), r"\[0, 10\)"),
        (torch.tensor([[2**63 + 5]], dtype=torch.uint64), "2\\*\\*63"),
        ([[1, 2], [3]], "integer tensor"),
    ],
)
def test_bad_ids_name_the_argument(ids, match):
    with pytest.raises(ValueError, match=match) as err:
        check_token_ids(ids, "input_ids", 10)
    assert "`input_ids`" in str(err.value)


def test_attention_mask_values_and_shape():
    assert check_attention_mask([[1, 0]], (1, 2)).tolist() == [[True, False]]
    assert check_attention_mask(torch.tensor([[1.0, 0.0]]), (1, 2)).dtype == torch.bool
    for bad, match in (([[1, 2]], "0 \\(padding\\) and 1"), ([[1]], "shape"), ([[0.5, 1]], "0 \\(padding\\)")):
        with pytest.raises(ValueError, match=match):
            check_attention_mask(bad, (1, 2))


def test_padding_sides_and_packing():
    left = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert padding_side(left) == "left" and padding_side(right) == "right"
    assert padding_side(torch.ones(2, 3, dtype=torch.bool)) == "none"
    assert padding_side(torch.zeros(1, 3, dtype=torch.bool)) == "left"  # an all-padding row (empty prompt)
    with pytest.raises(ValueError, match="left- or right-padded"):
        padding_side(torch.tensor([[1, 0, 1]], dtype=torch.bool))
    ids = torch.tensor([[5, 6, 0], [1, 2, 3]])
    packed, active = pack(ids, right, pads_first=True)
    assert packed.tolist() == [[0, 5, 6], [1, 2, 3]] and torch.equal(active, left)
    grown, grown_active = append_masks(packed, active, 2, M)
    assert grown.tolist() == [[0, 5, 6, M, M], [1, 2, 3, M, M]] and grown_active[:, 3:].all()
    back, back_active = pack(grown, grown_active, pads_first=False)
    assert back.tolist() == [[5, 6, M, M, 0], [1, 2, 3, M, M]] and not back_active[0, -1]


@pytest.mark.parametrize("start,total,block,window", [(3, 10, None, 16), (3, 10, 4, 16), (5, 40, None, 16),
                                                      (20, 100, 7, 16), (0, 33, 16, 16), (2, 5, 1, 1)])
def test_blocks_cover_the_region_left_to_right_inside_their_windows(start, total, block, window):
    blocks = plan_blocks(start, total, block, window)
    assert blocks[0][0] == start and blocks[-1][1] == total
    for (s, e, ws, we), nxt in zip(blocks, blocks[1:] + [None], strict=True):
        assert ws <= s < e <= we and we - ws <= window and we <= total
        assert nxt is None or nxt[0] == e
        if total <= window:
            assert (ws, we) == (0, total)  # LLaDA: the whole sequence, later blocks visible as masks
        else:
            assert we == max(e, min(total, window))  # the window ends with the block once it slides
    assert plan_blocks(5, 5, None, 16) == []


def test_eos_rule_pads_after_the_first_generated_eos_only():
    canvas = torch.tensor([[1, 2, 7, 3, 2, M, 4], [2, 1, 1, 1, 1, 1, 1]])
    generated = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = apply_eos(canvas, generated, [2], pad_id=0)
    # row 0: the prompt's 2 is not an EOS; the generated 2 at column 4 ends the row; column 6 is a fixed token
    assert out.tolist() == [[1, 2, 7, 3, 2, 0, 4], [2, 1, 1, 1, 1, 1, 1]]
    assert eos_reached(canvas, generated, [2]).tolist() == [True, False]
    assert apply_eos(canvas, generated, [3, 2], pad_id=0)[0].tolist() == [1, 2, 7, 3, 0, 0, 4]


def test_first_masked_column():
    canvas = torch.tensor([[1, 2, M, 4], [1, M, 3, 4]])
    active = torch.ones_like(canvas, dtype=torch.bool)
    assert first_masked_column(canvas, active, M) == 1
    assert first_masked_column(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), M) == 2


def test_stream_emitter_follows_the_transformers_protocol():
    calls = []

    class Full:
        def put(self, x):
            calls.append(("put", x.tolist()))

        def put_draft(self, x):
            calls.append(("draft", x.tolist()))

        def end(self):
            calls.append(("end",))

    class PutOnly:
        def put(self, x):
            calls.append(("put", x.tolist()))

        def end(self):
            calls.append(("end",))

    for streamer in (Full(), PutOnly()):
        e = StreamEmitter(streamer)
        e.prompt(torch.tensor([[1]]))
        e.draft(torch.tensor([[M]]))
        e.final(torch.tensor([[2]]))
        e.end()
    assert calls == [("put", [[1]]), ("draft", [[M]]), ("put", [[2]]), ("end",), ("put", [[1]]), ("put", [[2]]),
                     ("end",)]
    with pytest.raises(ValueError, match="streamer"):
        StreamEmitter(object())
