"""Streamers against transformers' own TextStreamer and TextDiffusionStreamer: drafts each step, the final
new tokens once (per block), the prompt skipped on request, end once."""

import pytest
import torch
from conftest import MASK, tiny_model
from test_evaluation import tiny_tokenizer
from transformers import TextDiffusionStreamer, TextStreamer

PROMPT = torch.tensor([[1, 2, 3]])


def recording(cls, **kwargs):
    """A transformers streamer whose printed text is recorded (on_finalized_text is its documented hook)."""

    class Recording(cls):
        def __init__(self):
            super().__init__(tiny_tokenizer(), **kwargs)
            self.text, self.drafts, self.puts, self.ends = [], [], [], 0

        def on_finalized_text(self, text, stream_end=False):
            self.text.append(text)

        def put(self, value):
            self.puts.append(value.clone())
            super().put(value)

        def end(self):
            self.ends += 1
            super().end()

    if hasattr(cls, "put_draft"):  # TextStreamer has none, and generate must not need it

        def put_draft(self, value, **kw):
            self.drafts.append(value.clone())
            cls.put_draft(self, value, **kw)

        Recording.put_draft = put_draft
    return Recording()


def generate(streamer, **kwargs):
    kw = dict(max_new_tokens=6, num_steps=4, generator=torch.Generator().manual_seed(0))
    return tiny_model().generate(PROMPT, streamer=streamer, **{**kw, **kwargs})


@pytest.mark.parametrize("skip_prompt", [True, False])
def test_text_streamer_prints_the_final_text_once(skip_prompt):
    streamer = recording(TextStreamer, skip_prompt=skip_prompt)
    out = generate(streamer)
    tok = tiny_tokenizer()
    new_text = tok.decode(out[0, 3:])
    printed = "".join(streamer.text)
    assert printed.strip() == (new_text if skip_prompt else tok.decode(out[0, :3]) + " " + new_text).strip()
    assert len(streamer.puts) == 2 and torch.equal(streamer.puts[0], PROMPT) and streamer.ends == 1
    assert not hasattr(streamer, "put_draft") and streamer.drafts == []  # no step's canvas is printed
    assert torch.equal(streamer.puts[1], out[:, 3:]) and not (streamer.puts[1] == MASK).any()


def test_text_diffusion_streamer_gets_every_draft_and_keeps_the_final_text(capsys):
    streamer = recording(TextDiffusionStreamer, skip_prompt=True)
    out = generate(streamer)
    assert len(streamer.drafts) == 4 and all(d.shape == (1, 6) for d in streamer.drafts)
    assert (streamer.drafts[0] == MASK).any() and torch.equal(streamer.drafts[-1], out[:, 3:])
    assert "".join(streamer.text).strip() == tiny_tokenizer().decode(out[0, 3:])  # not erased by the last draft
    assert streamer.ends == 1 and not streamer._has_draft
    capsys.readouterr()


def test_blockwise_streaming_puts_each_finished_block_once():
    streamer = recording(TextDiffusionStreamer, skip_prompt=True)
    out = generate(streamer, max_new_tokens=10, block_length=4, num_steps=2)
    assert [p.shape[1] for p in streamer.puts] == [3, 4, 4, 2]  # prompt, then blocks of 4, 4, 2
    assert torch.equal(torch.cat(streamer.puts[1:], 1), out[:, 3:])
    assert [d.shape[1] for d in streamer.drafts] == [4, 4, 4, 4, 2, 2]  # drafts show the current block only


def test_streamed_tokens_follow_the_eos_rule():
    streamer = recording(TextStreamer, skip_prompt=True)
    out = generate(streamer, eos_token_id=0, pad_token_id=7, temperature=0)
    assert out[0, 3:].tolist() == [0, 7, 7, 7, 7, 7] and torch.equal(streamer.puts[-1], out[:, 3:])


def test_streaming_an_infilling_canvas_skips_the_fixed_prefix():
    streamer = recording(TextStreamer, skip_prompt=True)
    canvas = torch.tensor([[1, 2, MASK, MASK, 5]])
    out = tiny_model().generate(canvas, streamer=streamer, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert streamer.puts[0].tolist() == [[1, 2]] and torch.equal(streamer.puts[1], out[:, 2:])
