"""The trainer's own resumable state, written without pickle: EMA weights and random-number states as safetensors
(+ JSON metadata); the counters live in `trainer_state.json` (train.py).

Accelerate's `save_state` still writes the model (safetensors) and the optimizer (`optimizer.bin`, which its
`load_state` reads with `torch.load(weights_only=True)`: tensors and plain containers only). Two of its files
are replaced here: the EMA is no longer a registered "custom object" (`custom_checkpoint_0.pkl`, which
Accelerate unpickles with `weights_only=False`), and its pickled RNG file (`random_states_N.pkl`, read with
`weights_only=True` plus numpy's array globals, and silently skipped when unreadable) is deleted after the save,
so `rng_state_N.safetensors` is the one source of the random states on resume.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

EMA_FILE = "ema.safetensors"
RNG_FILE = "rng_state_{}.safetensors"
ACCELERATE_RNG_FILE = "random_states_{}.pkl"
LEGACY_GENERATOR_FILE = "generator_{}.pt"  # checkpoints of earlier versions: a uint8 tensor, read weights_only
UNSAFE_PICKLES = "custom_checkpoint_*.pkl"  # Accelerate would unpickle these with weights_only=False


def save_ema(shadow: dict, decay: float, folder: str) -> None:
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in shadow.items()}
    save_file(tensors, os.path.join(folder, EMA_FILE), metadata={"decay": repr(float(decay))})


def load_ema(shadow: dict, folder: str) -> float:
    """Copy the saved EMA weights into `shadow` (same names and shapes, else ValueError); returns the decay."""
    path = os.path.join(folder, EMA_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"--resume: {folder!r} has no {EMA_FILE}, but this run keeps an EMA (--ema).")
    saved = load_file(path)
    with safe_open(path, framework="pt") as f:
        text = (f.metadata() or {}).get("decay", "")
    try:
        decay = float(text)
    except ValueError:
        decay = math.nan
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"--resume: {path}: the saved EMA decay {text!r} is not a number in [0, 1).")
    missing, unexpected = sorted(set(shadow) - set(saved)), sorted(set(saved) - set(shadow))
    shapes = [f"{n}: saved {tuple(saved[n].shape)} vs model {tuple(shadow[n].shape)}"
              for n in sorted(set(saved) & set(shadow)) if saved[n].shape != shadow[n].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"--resume: {path} does not fit this model: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {shapes}.")
    with torch.no_grad():
        for name, value in saved.items():
            shadow[name].copy_(value)
    return decay


def save_rng(folder: str, rank: int, generator: torch.Generator, accelerator_step: int) -> None:
    """This process's random states: its noise generator, torch (CPU and CUDA), Python's and numpy's."""
    tensors = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": json.dumps([version, list(state), gauss]),
            "numpy": json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(cached)]),
            "accelerator_step": str(int(accelerator_step))}
    save_file(tensors, os.path.join(folder, RNG_FILE.format(rank)), metadata=meta)
    accelerate_file = os.path.join(folder, ACCELERATE_RNG_FILE.format(rank))
    if os.path.isfile(accelerate_file):
        os.remove(accelerate_file)  # ours replaces it (see the module docstring)


def load_rng(folder: str, rank: int, generator: torch.Generator) -> int:
    """Restore what `save_rng` saved (after `accelerator.load_state`, so these states win); returns the
    accelerator's step counter. A checkpoint of an earlier version only has the generator (a `.pt` tensor, read
    with `weights_only=True`); Accelerate's own RNG file then holds the rest."""
    path = os.path.join(folder, RNG_FILE.format(rank))
    if not os.path.isfile(path):
        legacy = os.path.join(folder, LEGACY_GENERATOR_FILE.format(rank))
        if not os.path.isfile(legacy):
            raise ValueError(f"--resume: {folder!r} lacks {os.path.basename(path)} for this process.")
        generator.set_state(torch.load(legacy, weights_only=True))
        return -1
    try:
        return _restore_rng(path, generator)
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise ValueError(f"--resume: {path} holds malformed random states ({type(err).__name__}: {err}); delete "
                         "this checkpoint to resume from the previous one.") from err


def read_json_object(path: str, flag: str) -> dict:
    """The JSON object in `path`, which `flag` named; ValueError naming both when it is unreadable, not JSON, or
    not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{flag}: {path} is not a readable JSON file ({err}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag}: {path} holds a {type(data).__name__}, not a JSON object.")
    return data


def read_state(folder: str, name: str) -> dict:
    """`name` (trainer_state.json) in the checkpoint `folder`: a JSON object whose `step` is the step the folder is
    named after (`step_N`) and whose `baseline_ppl` is null or a positive number; ValueError naming the file."""
    path = os.path.join(folder, name)
    state = read_json_object(path, "--resume")
    step, base = state.get("step"), os.path.basename(os.path.normpath(folder))
    expected = int(base[5:]) if base.startswith("step_") and base[5:].isdigit() else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or expected not in (None, step):
        raise ValueError(f"--resume: {path}: `step` is {step!r}; expected a non-negative integer"
                         + (f" equal to the folder's step {expected}." if expected is not None else "."))
    ppl = state.get("baseline_ppl")
    if ppl is not None and (isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not math.isfinite(ppl)
                            or ppl <= 0):
        raise ValueError(f"--resume: {path}: `baseline_ppl` is {ppl!r}; expected null or a positive number.")
    return state


def _restore_rng(path: str, generator: torch.Generator) -> int:
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return int(meta.get("accelerator_step", -1))


def refuse_unsafe_pickles(folder: str) -> None:
    """A checkpoint holding `custom_checkpoint_*.pkl` (an EMA of an earlier version, or a planted file) would be
    unpickled by Accelerate with `weights_only=False`: refuse it before anything is loaded."""
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, UNSAFE_PICKLES)))
    if found:
        raise ValueError(
            f"--resume: {folder!r} holds {found}, which Accelerate would unpickle with full code execution (an EMA "
            "saved by fpmgm_hf before safetensors EMA checkpoints, or a planted file); refusing to load it. Start "
            "from the checkpoint's weights instead (--from with a save_pretrained folder), or resume from a "
            "checkpoint written by this version.")
