"""Read a PyTorch Lightning `.ckpt` (a torch pickle) without running any code from it.

`torch.load(weights_only=True)` rebuilds only tensors and plain containers, and refuses any other Python global
the pickle names. A Lightning checkpoint holds a few more: MDLM's `save_hyperparameters()` stores the OmegaConf
`config` (DictConfig, ListConfig, their nodes and metadata) and the `tokenizer` object. For one load, each
global on the allow-list below is mapped to an inert stand-in class of ours, which records what the pickle hands
it and runs nothing of the original class (omegaconf and the tokenizer libraries need not even be installed);
`to_plain` turns the config stand-ins into dicts and lists. Any other global is refused with an
`UnsafeCheckpointError` naming it. `trust_pickle=True` (`--trust-pickle`) loads with full unpickling instead:
only for files you trust, since a pickle can call any importable function.

The allow-list is installed with `torch.serialization.safe_globals(...)`, a context manager around the one
`torch.load` call; torch keeps that list per process, so two threads loading at the same moment can refuse a
file (with the error below), never load something unsafe.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings

import torch

__all__ = ["UnsafeCheckpointError", "load_checkpoint", "stand_in_for", "to_plain"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint names Python globals outside the allow-list; loading it could run code."""


class _StandIn:
    """Takes the place of a pickled object: keeps the constructor arguments and the pickled state, nothing else."""

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert stand-in for {self.pickled_name}>"


class _Container(_StandIn):
    """OmegaConf DictConfig / ListConfig: the values are in `state['_content']`."""


class _Node(_StandIn):
    """An OmegaConf value node: the value is `state['_val']`."""


class _Opaque(_StandIn):
    """Metadata, type markers and tokenizer objects: kept, never read."""


def _empty_dict(*args, **kwargs) -> dict:
    """Stands in for `collections.defaultdict(factory)` (OmegaConf's resolver cache): a plain dict, so the
    pickle's SETITEMS still applies and no factory is kept."""
    return {}


_OMEGACONF_NODES = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode")
_KINDS: dict[str, type] = {
    "omegaconf.dictconfig.DictConfig": _Container,
    "omegaconf.listconfig.ListConfig": _Container,
    **{f"omegaconf.nodes.{n}": _Node for n in _OMEGACONF_NODES},
    # Type markers inside OmegaConf metadata (ref_type, object_type, key_type, element_type).
    **{name: _Opaque for name in ("omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata", "typing.Any",
                                  "builtins.dict", "builtins.list", "builtins.int", "builtins.float",
                                  "builtins.str", "builtins.bool", "builtins.bytes", "builtins.tuple")},
    # The tokenizer object MDLM keeps in its hyper-parameters (text8: its own character tokenizer).
    **{name: _Opaque for name in ("tokenizers.Tokenizer", "tokenizers.AddedToken", "tokenizers.models.Model",
                                  "dataloader.Text8Tokenizer")},
}
# Any class of a transformers tokenizer module (GPT2TokenizerFast, BertTokenizerFast, TokenizersBackend, ...).
_TOKENIZER_CLASS = re.compile(r"transformers\.(?:models\.\w+\.)?tokenization_\w+\.\w+")


def stand_in_for(name: str):
    """A new inert stand-in for the pickled global `module.qualname`, or None if it is not allow-listed."""
    if name == "collections.defaultdict":
        return _empty_dict
    kind = _KINDS.get(name) or (_Opaque if _TOKENIZER_CLASS.fullmatch(name) else None)
    # One class per name: the unpickler accepts a class by identity, and the name shows in its repr.
    return None if kind is None else type(kind.__name__, (kind,), {"pickled_name": name, "__module__": __name__})


def _refusal(path: str, names) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} refers to Python globals that are not allow-listed: {', '.join(sorted(names))}. Loading them "
        "would let the file run code (a pickle can call any importable function). Only tensors, plain containers, "
        "Lightning's OmegaConf config and MDLM's tokenizer object are read safely. If you trust this file, pass "
        "trust_pickle=True (CLI: --trust-pickle); that runs whatever code the file contains.")


def _globals_needed(path: str):
    """The globals of `path` that torch's safe loader does not know; None when the file cannot be scanned
    (a legacy or corrupt file: torch.load reports it)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - any scan failure leaves the verdict to the safe loader itself
        return None


def load_checkpoint(path, trust_pickle: bool = False):
    """`torch.load(path)` on CPU that never runs code from the file unless `trust_pickle=True` (module docstring).

    Raises:
        UnsafeCheckpointError: the file names a global outside the allow-list (all of them are named).
        Whatever `torch.load` raises for an unreadable file.
    """
    path = os.fspath(path)
    if trust_pickle:
        warnings.warn(f"{path}: trust_pickle=True, loading with full unpickling; any code in the file runs.",
                      stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)
    if not hasattr(torch.serialization, "safe_globals"):
        raise UnsafeCheckpointError(f"{path}: reading a Lightning checkpoint safely needs torch >= 2.6; upgrade "
                                    "torch, or pass trust_pickle=True for a file you trust.")
    needed = _globals_needed(path)
    names = needed if needed is not None else [*_KINDS, "collections.defaultdict"]
    stand_ins = {name: stand_in_for(name) for name in names}
    refused = [name for name, obj in stand_ins.items() if obj is None]
    if refused:
        raise _refusal(path, refused)
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in stand_ins.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a global the scan did not see
        match = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        if match:
            raise _refusal(path, [match.group(1)]) from err
        raise


MAX_CONFIG_DEPTH = 64  # a real MDLM config nests 3-4 levels
MAX_CONFIG_NODES = 100_000  # a real one has a few hundred entries


def to_plain(obj):
    """Config stand-ins (and real OmegaConf containers, after a trusted load) -> plain dicts / lists / values.

    A pickle can share one container many times (a list holding itself twice, forty levels deep, expands to 2^40
    items) or refer to itself: shared parts are converted once and reused, a cycle or a config nested deeper than
    `MAX_CONFIG_DEPTH` or larger than `MAX_CONFIG_NODES` entries raises `ValueError` instead of hanging."""
    return _Plainer().convert(obj, 0)


class _Plainer:
    def __init__(self):
        self.done: dict[int, object] = {}
        self.open: set[int] = set()
        self.nodes = 0

    def convert(self, obj, depth: int):
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if key in self.open:
            raise ValueError("the config refers to itself (a cycle)")
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"the config nests deeper than {MAX_CONFIG_DEPTH} levels")
        self.nodes += 1
        if self.nodes > MAX_CONFIG_NODES:
            raise ValueError(f"the config holds more than {MAX_CONFIG_NODES} entries")
        self.open.add(key)
        try:
            out = self._convert(obj, depth + 1)
        finally:
            self.open.discard(key)
        self.done[key] = out
        return out

    def _convert(self, obj, depth: int):
        if isinstance(obj, _Container):
            return self.convert(obj.state.get("_content") if isinstance(obj.state, dict) else None, depth)
        if isinstance(obj, _Node):
            return obj.state.get("_val") if isinstance(obj.state, dict) else None
        if isinstance(obj, dict):
            return {k: self.convert(v, depth) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.convert(v, depth) for v in obj]
        if hasattr(obj, "items") and callable(obj.items):  # omegaconf.DictConfig from a trusted load
            try:
                return {k: self.convert(v, depth) for k, v in obj.items()}
            except ValueError:
                raise
            except Exception:  # noqa: BLE001 - an unresolvable interpolation: keep the object as is
                return obj
        return obj
