"""Reference defences the tool builds itself (issue 29), one module each: a method is the
defender's objective (base.DefenceMethod); the builder (build.py) trains a starting checkpoint with
it and writes an ordinary checkpoint folder the sweep then attacks. Adding one: a module here and
its name in METHODS."""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "deep": "trainables.defences.deep:Deep",
    "repnoise": "trainables.defences.repnoise:RepNoise",
    "vaccine": "trainables.defences.vaccine:Vaccine",
    "booster": "trainables.defences.booster:Booster",
    "tar": "trainables.defences.tar:TAR",
}
"""name -> module:class; a module is imported when its method is first named (they import torch)."""


def method_class(name: str) -> type:
    """The class of a defence method; ValueError naming the methods there are."""
    if name not in METHODS:
        import difflib

        near = difflib.get_close_matches(name, list(METHODS), n=1)
        raise ValueError(f"method: unknown defence method {name!r} ({f'did you mean {near[0]!r}? ' if near else ''}"
                         f"methods: {', '.join(METHODS)})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
