"""Integrations with other libraries: diffusers' quantizer API (``diffusers_quantizer``).

``import svdquant`` calls :func:`register_diffusers_backend`. Importing diffusers' quantizers costs ~3 s,
which every ``svdquant`` command (even one that only reports a typo) would pay, so the backend is
added to diffusers' mappings at the moment diffusers itself imports them (diffusers reads them only
in ``from_pretrained``, after that import), or at once if they are already imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_AUTO = "diffusers.quantizers.auto"


def _register_now() -> None:
    partial = sys.modules.get(f"{__name__}.diffusers_quantizer")
    if partial is not None and not hasattr(partial, "register"):
        return  # it is being imported (its own imports load diffusers' quantizers): it registers at its end
    from .diffusers_quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``diffusers.quantizers.auto`` to register after it runs."""

    def find_spec(self, name, path=None, target=None):
        if name != _AUTO:
            return None
        sys.meta_path.remove(self)  # one shot, and so the lookup below finds the real spec
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _register_now()

        spec.loader.exec_module = exec_module
        return spec


def register_diffusers_backend() -> None:
    if _AUTO in sys.modules:
        _register_now()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
