"""What every runner is: the interface :class:`~svdquant.SVDQLinear` and the stacked q/k/v layer rely on.

A runner is a quantized linear's forward with everything prepared (:func:`svdquant.ops.prepare` builds it from a
layer's buffers): ``__call__(x2)`` maps ``[M, K]`` to ``[M, N]`` and does nothing but compute. What a runner can do
beyond that is declared here as class attributes, so the layers ask the runner, never probe it:

| capability          | meaning                                                                         | who      |
| ------------------- | ------------------------------------------------------------------------------- | -------- |
| fuses_gelu          | applies the layer's output tanh-GELU itself (its ``gelu`` attribute)            | INT8     |
| quantizes_in_graph  | can quantize its activations in torch ops under ``torch.compile`` (``act_in_graph``) | INT8 |
| stacks              | runners that read one input combine into one (:meth:`Runner.stack`)              | INT8, dense, W4A16 |
| fuses_input_gelu    | applies the layer's input GELU itself (``input_gelu_from``), as it reads X      | INT8     |
| owns_packed_weight  | holds the layer's only copy of its weight: the layer drops its packed codes and | INT8 speed mode, W4A16 stacked |
|                     | asks :meth:`Runner.packed_weight` for them (an instance's value)                |          |
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..formats import get_format


@dataclass(frozen=True)
class Gpu:
    """What a GPU runner is built for: the layer's CUDA device, its compute capability and the kernels module."""

    device: torch.device
    capability: tuple[int, int]
    kernels: Any


class Runner:
    """The base of every runner (see the module doc for the capabilities)."""

    fuses_gelu: ClassVar[bool] = False
    quantizes_in_graph: ClassVar[bool] = False
    stacks: ClassVar[bool] = False
    fuses_input_gelu: ClassVar[bool] = False
    owns_packed_weight: bool = False

    def __deepcopy__(self, memo) -> "Runner":
        """A copy of a model copies its runners: tensors through ``memo`` (so the copy's runner holds the copy's
        buffers), the kernels module they launch from and read-only tables by reference (neither copies)."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in vars(self).items():
            shared = isinstance(value, (types.ModuleType, types.MappingProxyType))
            setattr(new, name, value if shared else copy.deepcopy(value, memo))
        return new

    @classmethod
    def build(cls, m, gpu: Gpu) -> "Runner":
        """The runner of layer ``m`` on ``gpu`` (:mod:`svdquant.ops.routes` calls it for the route it chose)."""
        return cls(m, gpu.kernels)

    def set_branch(self, m) -> bool:
        """A LoRA was added, rescaled or removed: only the branch changes (in place where it can; True if the
        runner now holds other tensors than before)."""
        raise NotImplementedError

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def call_concat(self, head2: torch.Tensor, tail2: torch.Tensor) -> torch.Tensor:
        """``self(torch.cat([head2, tail2], -1))``; the INT8 runner overrides it to read both where they are."""
        return self(torch.cat([head2, tail2], -1))

    def packed_weight(self) -> torch.Tensor:
        """The layer's packed 4-bit codes, rebuilt (runners that ``owns_packed_weight``)."""
        raise NotImplementedError(f"{type(self).__name__} does not hold the layer's weight")

    @classmethod
    def stack(cls, runners: list["Runner"], out_features: list[int]) -> "Runner":
        """One runner over the output rows of ``runners`` (all of this class) that read the same input; the members
        may be rebound to views of it. Raises ValueError where these cannot stack (runners that ``stacks``)."""
        raise ValueError(f"{cls.__name__} runners do not stack")

    def restack_branch(self, runners: list["Runner"]) -> bool:
        """A stacked runner's members changed their branches: take them again (True if it now holds other
        tensors). Runners whose members rewrite their rows in place have nothing to do."""
        return False


def activation_group(m) -> int:
    """Channels per activation scale of layer ``m``: 0 for one scale per token."""
    return 0 if get_format(m.activations).group_sizes == (0,) else m.group_size


class Unready(Runner):
    """A layer whose tensors are not there yet: calling it says what to do."""

    def __init__(self, message: str):
        self.message = message

    def set_branch(self, m) -> bool:
        return False

    def __call__(self, x2):
        raise RuntimeError(self.message)


ON_META = Unready("this SVDQLinear is on the meta device: load its tensors (load_state_dict / "
                  "svdquant.load_quantized) before running it")
EMPTY_ON_GPU = Unready("this SVDQLinear was built empty on a GPU: fill its buffers (load_state_dict, or copy_ "
                       "and then .refresh()) before running it")
