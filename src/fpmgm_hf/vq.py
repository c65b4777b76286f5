"""Compatibility shim: `fpmgm_hf.vq` moved to `fpmgm_hf.images.vq` (docs/architecture.md).

Every attribute is looked up on the new module (the same objects: classes, functions, constants);
`python -m fpmgm_hf.vq` still runs it.
Import from the new path in new code, and patch attributes there.
"""

import sys
from importlib import import_module

_MOVED = import_module("fpmgm_hf.images.vq")


def __getattr__(name: str):
    return getattr(_MOVED, name)


def __dir__() -> list[str]:
    return dir(_MOVED)


if __name__ == "__main__":
    sys.exit(_MOVED.main())
