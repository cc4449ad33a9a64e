"""What a pipeline calls on a model instead of its forward, run as calls of the model (:class:`CallThrough`).

Streaming moves a pipeline's other models to the device through their forward hooks
(:class:`~svdquant.calibration.offload.Streamed`); an autoencoder is called through ``encode`` and ``decode``,
which do not run them.
"""

from __future__ import annotations

import functools

import torch.nn as nn

# What a diffusers pipeline calls on a model instead of its forward: an autoencoder's encode and decode (those diffusers
# marks for accelerate's offload hooks, ``apply_forward_hook``: FluxKontextPipeline's input image, every output_type
# but "latent"). No text encoder has either.
ENTRY_METHODS = ("encode", "decode")
_UNSET = object()


def entry_methods(module: nn.Module) -> list[str]:
    """Those of :data:`ENTRY_METHODS` that ``module``'s class has."""
    return [name for name in ENTRY_METHODS if callable(getattr(type(module), name, None))]


class CallThrough:
    """``module.<name>(...)`` run as a call of ``module``: through ``module(...)``, the method in the place of its
    forward for that one call, so that the forward hooks run around it (the streaming ones, which put the module and
    its inputs on the device and its outputs back where the inputs were; a hook that stops the calibration's pass
    ahead at the module). Without it a pipeline that makes its inputs on the device (once anything of it stays there
    between calls, diffusers' execution device is the GPU) hands ``vae.encode`` GPU inputs and CPU weights.
    Installed on the instance; :meth:`remove` puts back what was there."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name
        self.before = module.__dict__.get(name, _UNSET)
        self.method = getattr(module, name)
        functools.update_wrapper(self, self.method)
        module.__dict__[name] = self

    def __call__(self, *args, **kwargs):
        module, forward = self.module, self.module.__dict__.get("forward", _UNSET)

        def once(*a, **kw):  # the forward back from here: the method may call the module itself
            _put(module, "forward", forward)
            return self.method(*a, **kw)

        module.__dict__["forward"] = once
        try:
            return module(*args, **kwargs)
        finally:
            _put(module, "forward", forward)

    def remove(self) -> None:
        if self.module.__dict__.get(self.name) is self:
            _put(self.module, self.name, self.before)


def _put(module: nn.Module, name: str, value) -> None:
    if value is _UNSET:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = value
