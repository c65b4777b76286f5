"""Validation shared by the Hub-side files: config checks (every failure is a `ValueError` naming the config
class, the field, the value and what is allowed; NaN never passes a numeric check) and the weight-file check
behind `CheckedWeightsMixin.from_pretrained`.

Hub-portable: standard library only.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile


def fail(owner: str, field: str, value, allowed) -> None:
    raise ValueError(f"{owner}: `{field}`={value!r} is invalid; allowed: {allowed}.")


def check_int(owner: str, field: str, value, low: int, high=None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        fail(owner, field, value, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))


def check_float(owner: str, field: str, value, low: float, high: float, low_open=False, high_open=False) -> None:
    """`value` is a real number in the interval from `low` to `high` (open ends as flagged)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        fail(owner, field, value, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def check_range(owner: str, field: str, value, low: int) -> tuple[int, int]:
    """A pair (lo, hi) of integers with low <= lo <= hi; returned as a tuple (JSON gives lists)."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
        or value[0] < low
        or value[0] > value[1]
    ):
        fail(owner, field, value, f"a pair (lo, hi) of integers with {low} <= lo <= hi")
    return (int(value[0]), int(value[1]))


def weight_file_problems(folder: str) -> list[str]:
    """Truncated or corrupt weight files in `folder`, checked from their headers without loading them:
    `*.safetensors` (the 8-byte header length, the JSON header, and a size that covers every tensor) and
    torch zip archives (`*.bin`, `*.pt`, `*.pth`: the zip directory and the member CRCs). Returns one line per
    bad file; an empty list when everything is readable."""
    problems = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            why = _safetensors_problem(path)
        elif name.endswith((".bin", ".pt", ".pth")) and os.path.isfile(path):
            why = _zip_problem(path)
        else:
            continue
        if why:
            problems.append(f"{path}: {why}")
    return problems


def _safetensors_problem(path: str):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, shorter than the 8-byte header length)"
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            return f"truncated (the header alone needs {8 + n} bytes, the file has {size})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "corrupt JSON header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"truncated (the tensors need {need} bytes, the file has {size})"
    return None


def _zip_problem(path: str):
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a readable torch archive ({err})"
    return f"corrupt member {bad!r}" if bad else None


def check_local_weights(owner: str, name_or_path, subfolder: str = "") -> None:
    """Raise `OSError` listing the bad weight files when `name_or_path` (+ `subfolder`) is a local folder
    holding truncated or corrupt ones; Hub ids and missing folders are left to `from_pretrained`."""
    folder = os.path.join(str(name_or_path), subfolder or "")
    if not os.path.isdir(folder):
        return
    bad = weight_file_problems(folder)
    if bad:
        raise OSError(f"{owner}.from_pretrained: truncated or corrupt weights in {folder!r}:\n  " + "\n  ".join(bad)
                      + "\nRe-save the model or download it again (force_download=True).")


class CheckedWeightsMixin:
    """Put before `PreTrainedModel`: `from_pretrained` on a local folder first checks its weight files, so a
    truncated copy or download is reported by name instead of as a bare safetensors header error."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        check_local_weights(cls.__name__, pretrained_model_name_or_path, kwargs.get("subfolder", ""))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
