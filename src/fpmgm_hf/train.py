"""Compatibility shim: `fpmgm_hf.train` moved to `fpmgm_hf.training.train` (docs/architecture.md).

Every attribute is looked up on the new module (the same objects: classes, functions, constants);
`python -m fpmgm_hf.train` still runs it.
Import from the new path in new code, and patch attributes there.
"""

from importlib import import_module

_MOVED = import_module("fpmgm_hf.training.train")


def __getattr__(name: str):
    return getattr(_MOVED, name)


def __dir__() -> list[str]:
    return dir(_MOVED)


if __name__ == "__main__":
    _MOVED.main()
