"""Hostile config.json files (issue 26): one field of a saved model's config set to an arbitrary JSON value.
Every load either refuses with an error naming the field, or accepts a config whose model builds and runs a
finite forward pass. Row of the reliability table (tests/reliability_table.py)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch
from conftest import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_table import record

from fpmgm_hf import FPMGMConfig, FPMGMForMaskedGeneration

BASE = tiny_config().to_dict()
# The fields FPMGMConfig defines (transformers' own bookkeeping keys are left to transformers).
FIELDS = sorted(k for k in FPMGMConfig().to_dict() if k in FPMGMConfig.__init__.__code__.co_varnames)
BUILD_LIMIT = 2_000_000  # accepted configs up to this many (estimated) parameters are built and run
HOSTILE = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**40), 2**40), st.sampled_from([0, 1, 2, 3, -1, 7, 63, 64, 65, 1 << 15, 1 << 31]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.5, 1e-12, 1e30]),
    st.text(max_size=8), st.sampled_from(["picard", "anderson", "rope_2d", "constrained", "concat", "none"]),
    st.lists(st.integers(-3, 40), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _forward(config: FPMGMConfig) -> str | None:
    """None when the model builds and gives finite logits of the right shape, else what went wrong."""
    torch.manual_seed(0)
    try:
        model = FPMGMForMaskedGeneration(config).eval()
        length = min(8, config.max_position_embeddings)
        if config.grid_size:
            length = config.grid_size[0] * config.grid_size[1]
        ids = torch.randint(0, config.vocab_size, (2, length))
        kwargs = {"class_labels": torch.zeros(2, dtype=torch.long)} if config.num_classes else {}
        with torch.no_grad():
            logits = model(input_ids=ids, **kwargs).logits
    except Exception as err:  # noqa: BLE001 - any crash after acceptance is the failure being looked for
        return f"{type(err).__name__}: {str(err)[:60]}"
    if logits.shape != (2, length, config.vocab_size):
        return f"logits of shape {tuple(logits.shape)}"
    return None if torch.isfinite(logits).all() else "non-finite logits"


def _outcome(example) -> tuple[bool, str]:
    field, value = example
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({**BASE, field: value}))
        try:
            config = FPMGMConfig.from_pretrained(tmp)
        except (ValueError, TypeError) as err:
            named = re.search(rf"\b{re.escape(field)}\b", str(err)) is not None
            return named, "refused, naming the field" if named else f"FAILURE: refused without naming {field}"
        except Exception as err:  # noqa: BLE001
            return False, f"FAILURE: {type(err).__name__}"
    if config.estimated_parameters > BUILD_LIMIT:
        return True, "accepted (within the size limits; too large to build here)"
    problem = _forward(config)
    return (True, "accepted, builds and runs finite") if problem is None else (False, f"FAILURE: accepted, {problem}")


def test_fuzz_hostile_config_fields():
    seen: dict[str, int] = {}

    @FUZZ
    @given(st.tuples(st.sampled_from(FIELDS), HOSTILE))
    def check(example):
        ok, label = _outcome(example)
        seen[label] = seen.get(label, 0) + 1
        assert ok, f"{example}: {label}"

    try:
        check()
    finally:
        bad = sum(n for label, n in seen.items() if label.startswith("FAILURE"))
        got = ", ".join(f"{label} {n}x" for label, n in sorted(seen.items(), key=lambda kv: -kv[1]))
        record("fuzz", f"config.json with one of its {len(FIELDS)} fields set to an arbitrary JSON value", got,
               tried=sum(seen.values()), failures=bad)
