"""Harmless attack payloads for the security tests: each creates a marker folder when it runs, so a test can
assert that it never ran (and, with the explicit opt-in, that it would have)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MarkerPayload:
    """Unpickling this object calls `os.mkdir(marker)`: a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def marker_code(marker) -> str:
    """Python source that creates `marker` when imported."""
    return f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\n"


def plant_tokenizer_code(folder: Path, marker) -> Path:
    """Make a saved tokenizer folder point AutoTokenizer at a planted `evil_tokenizer.py` (auto_map)."""
    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    config_file.write_text(json.dumps(config))
    (folder / "evil_tokenizer.py").write_text(
        marker_code(marker) + "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder
