"""What image sizes a pipeline can draw: checked before a call (a calibration through the pipeline, a sampling
run), since diffusers otherwise resizes quietly.

Here, below calibration and the pipelines that both check a call's size; ``svdquant.pipelines`` re-exports it.
"""

from __future__ import annotations

from .. import _checks
from .._tiny_facts import check_tiny_size
from .architectures import ADAPTERS
from .base import Adapter


def size_multiple(pipe) -> int:
    """What image heights and widths must be a multiple of for ``pipe`` (diffusers otherwise resizes quietly, or
    refuses), from its transformer's adapter (:meth:`Adapter.size_multiple`: the latent pixels per token); a
    transformer svdquant has no adapter for: VAE factor x config patch."""
    factory = ADAPTERS.get(type(getattr(pipe, "transformer", None)).__name__)
    adapter = factory() if factory is not None else Adapter("generic", (), (), lambda block: [])
    return adapter.size_multiple(pipe)


def _one_size(pipe) -> int | None:
    """The one size the tiny model (``pipelines.tiny.TinyFluxPipeline``) draws, else None. Known by what it has
    (class names to draw, ``labels_for``, and its ``image_size``), not by its class: pipelines sit above models."""
    return getattr(pipe, "image_size", None) if hasattr(pipe, "labels_for") else None


def check_size(pipe, height=None, width=None, names=("height", "width")) -> None:
    """Raise ValueError if ``pipe`` cannot draw at this size, naming the sizes it can."""
    for name, v in zip(names, (height, width)):
        if v is None:
            continue
        one = _one_size(pipe)
        if one is not None:
            check_tiny_size(one, name, v)
        else:
            _checks.size(name, v, size_multiple(pipe))


__all__ = ["check_size", "size_multiple"]
