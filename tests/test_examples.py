"""Examples run with tiny arguments (smoke tests)."""

import sys
from pathlib import Path

import torch
from conftest import MASK, tiny_model
from test_evaluation import tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))


def test_generate_text_keeps_prompt_and_suffix(tmp_path):
    import generate_text

    tok = tiny_tokenizer()
    tiny_model().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = generate_text.main(
        [
            "--model",
            str(tmp_path / "m"),
            "--prompt",
            "w1 w2",
            "--suffix",
            "w3",
            "--length",
            "12",
            "--budget",
            "24",
            "--samples",
            "2",
        ]
    )
    seq = out.sequences
    assert seq.shape == (2, 12) and not (seq == MASK).any()
    assert seq[:, :2].tolist() == [[1, 2], [1, 2]] and seq[:, -1].tolist() == [3, 3]
    assert (out.block_passes <= 24).all()


def test_generate_text_refuses_a_canvas_without_room(tmp_path):
    import generate_text

    tok = tiny_tokenizer()
    try:
        generate_text.build_canvas(tok, "w1 w2 w3", "w4", 4)
    except ValueError as err:
        assert "--length" in str(err)
    else:
        raise AssertionError("expected a ValueError")
    assert generate_text.build_canvas(tok, "w1", "", 3).tolist() == [[1, MASK, MASK]]
    assert torch.is_tensor(generate_text.build_canvas(tok, "w1", "w2", 4))
