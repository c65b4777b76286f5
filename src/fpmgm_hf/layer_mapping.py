"""Compatibility shim: `fpmgm_hf.layer_mapping` moved to `fpmgm_hf.conversion.layer_mapping` (docs/architecture.md).

Every attribute is looked up on the new module (the same objects: classes, functions, constants).
Import from the new path in new code, and patch attributes there.
"""

from importlib import import_module

_MOVED = import_module("fpmgm_hf.conversion.layer_mapping")


def __getattr__(name: str):
    return getattr(_MOVED, name)


def __dir__() -> list[str]:
    return dir(_MOVED)
