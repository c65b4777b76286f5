"""What a streamer receives from `generate`, in transformers' protocol (`TextStreamer`, `TextDiffusionStreamer`).

1. `put(prompt)` once first: the canvas up to the first masked column, so `skip_prompt=True` skips it.
2. `put_draft(tokens)` after every denoising step (only if the streamer has `put_draft`): the tokens of the
   block being decoded, masks included. A plain `TextStreamer` gets no drafts.
3. `put(tokens)` once per finished block with its final tokens (after the EOS rule): without `block_length`,
   once in total with all new tokens.
4. `end()` once.

Hub-portable: imports only torch and the standard library.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class StreamEmitter:
    """Feeds an optional streamer; every call is a no-op without one. Tensors are sent on the CPU."""

    def __init__(self, streamer: Optional[Any]):
        if streamer is not None:
            if not callable(getattr(streamer, "end", None)) or not (
                callable(getattr(streamer, "put", None)) or callable(getattr(streamer, "put_draft", None))
            ):
                raise ValueError(
                    f"`streamer` must have `end()` and `put()` (or `put_draft()`), like transformers' "
                    f"`TextStreamer`; got {type(streamer).__name__}."
                )
        self.streamer = streamer

    def _call(self, method: str, tokens: torch.Tensor) -> None:
        fn = getattr(self.streamer, method, None) if self.streamer is not None else None
        if callable(fn):
            fn(tokens.detach().cpu())

    def prompt(self, tokens: torch.Tensor) -> None:
        self._call("put", tokens)

    def draft(self, tokens: torch.Tensor) -> None:
        self._call("put_draft", tokens)

    def final(self, tokens: torch.Tensor) -> None:
        self._call("put", tokens)

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
