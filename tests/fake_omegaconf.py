"""Pickle-level look-alikes of OmegaConf 2.3 containers, registered under omegaconf's module names, so that a
pickle of them has the globals and the NEWOBJ / BUILD structure of a real Lightning `hyper_parameters['config']`
(checked against a real omegaconf 2.3 pickle: DictConfig, ListConfig, AnyNode, ContainerMetadata, Metadata,
typing.Any, builtins.dict/list/int, collections.defaultdict). omegaconf itself need not be installed."""

from __future__ import annotations

import sys
import types
import typing
from collections import defaultdict

_CLASSES = {"omegaconf.dictconfig": "DictConfig", "omegaconf.listconfig": "ListConfig",
            "omegaconf.nodes": "AnyNode", "omegaconf.base": ("ContainerMetadata", "Metadata")}


def install(monkeypatch) -> dict:
    """Put the fake modules into sys.modules for the test (pickle finds classes by module and name)."""
    classes = {}
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    for module, names in _CLASSES.items():
        mod = types.ModuleType(module)
        for name in (names,) if isinstance(names, str) else names:
            cls = type(name, (), {"__module__": module, "__qualname__": name})
            setattr(mod, name, cls)
            classes[name] = cls
        monkeypatch.setitem(sys.modules, module, mod)
    return classes


def _new(cls, **fields):
    obj = cls.__new__(cls)
    obj.__dict__.update(fields)
    return obj


def build(value, classes, key=None, parent=None):
    """`value` (dicts, lists, scalars) as DictConfig / ListConfig / AnyNode look-alikes, as OmegaConf stores it."""
    if isinstance(value, (dict, list)):
        is_dict = isinstance(value, dict)
        meta = _new(classes["ContainerMetadata"], ref_type=typing.Any, object_type=dict if is_dict else list,
                    optional=True, key=key, flags={}, flags_root=False, resolver_cache=defaultdict(dict),
                    key_type=typing.Any if is_dict else int, element_type=typing.Any)
        node = _new(classes["DictConfig" if is_dict else "ListConfig"], _metadata=meta, _parent=parent)
        items = value.items() if is_dict else enumerate(value)
        content = {k: build(v, classes, k, node) for k, v in items}
        node._content = content if is_dict else list(content.values())
        return node
    meta = _new(classes["Metadata"], ref_type=typing.Any, object_type=None, optional=True, key=key, flags={},
                flags_root=False)
    return _new(classes["AnyNode"], _metadata=meta, _parent=parent, _val=value)
