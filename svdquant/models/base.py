"""What an adapter tells the quantizer about an architecture.

An :class:`Adapter` names the model's block stacks (so calibration can run one block
at a time), how one block's outputs become the next block's inputs, and, per block,
the groups of linears to quantize (:class:`Group`). Layers in no group stay 16-bit
and are listed as skipped in the report.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

# A group member is a plain ``nn.Linear`` or a 1×1 ``nn.Conv2d`` (a linear over channels).
QUANTIZABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Group:
    """Linears (paths relative to their block) that read the same input and are quantized together.

    weight_only: keep activations 16-bit (FLUX's adaLN modulation linears): no smoothing,
        no branch, weights in the recipe's weight format.
    post_gelu: the input follows a GELU: ``True`` for all channels, or the first channel
        index of a GELU part (FLUX single-block ``proj_out`` reads [attention | GELU(mlp)]).
    shared_branch: one low-rank branch for the whole group (q/k/v) or one per member.
    weight_format: a weight-only group's format when it is not the recipe's weight-only one (Z-Image's adaLN:
        ``"int8"``, per-channel scales, whatever the recipe), a name from :mod:`svdquant.formats`.
    """

    names: tuple[str, ...]
    weight_only: bool = False
    post_gelu: bool | int = False
    shared_branch: bool = True
    weight_format: str | None = None


@dataclass
class Adapter:
    """How to quantize one architecture.

    stacks: attribute paths of the ``nn.ModuleList`` s of blocks, in execution order
        (empty: the whole model is calibrated in one pass).
    outputs: names of the values a block returns, in order (``("encoder_hidden_states",
        "hidden_states")`` for FLUX); they replace the same-named inputs of the next block.
    groups: block -> the groups to quantize in it.
    stack_outputs: per stack, its blocks' outputs where they differ from ``outputs`` (FLUX.2's single
        blocks return the one joint stream its double blocks split in two).
    patch: latent pixels per token side, where the transformer's config does not say it as one
        ``patch_size`` int (FLUX packs 2x2 latents in its pipeline; Wan's patch is (t, h, w)).
    model_groups: linears of the model outside its blocks (FLUX.2's shared modulation, embedders), each a
        weight-only :class:`Group` with its ``weight_format``, named from the model's root: rounded to nearest
        after the blocks, with no calibration inputs.
    batch_inputs: the blocks' arguments whose leading dimension is the call's images (for every stack); with them
        the replays join one-image recorded calls into calls of a few (:mod:`svdquant.calibration.merge`); empty:
        never joined.
    """

    name: str
    stacks: tuple[str, ...]
    outputs: tuple[str, ...]
    groups: Callable[[nn.Module], list[Group]]
    notes: list[str] = field(default_factory=list)
    stack_outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    patch: int | None = None
    model_groups: tuple[Group, ...] = ()
    batch_inputs: tuple[str, ...] = ()

    def outputs_of(self, block: str) -> tuple[str, ...]:
        """What the block named ``block`` (``"stack.i"``) returns, in order."""
        return self.stack_outputs.get(block.rsplit(".", 1)[0], self.outputs)

    def size_multiple(self, pipe) -> int:
        """What image heights and widths must be a multiple of for ``pipe`` running this model: the VAE's
        spatial factor times the latent pixels per token (diffusers otherwise resizes quietly, or refuses)."""
        vae = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
        patch = self.patch
        if patch is None:
            patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None) or 1
        return vae * patch

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        for stack in self.stacks:
            seq = model.get_submodule(stack)
            out += [(f"{stack}.{i}", b) for i, b in enumerate(seq)]
        return out


def present(block: nn.Module, *names: str) -> tuple[str, ...]:
    """The names that exist in ``block`` as quantizable modules (blocks differ: SD3's last has no ff_context)."""
    found = []
    for n in names:
        try:
            m = block.get_submodule(n)
        except AttributeError:
            continue
        if isinstance(m, QUANTIZABLE) and is_quantizable(m):
            found.append(n)
    return tuple(found)


def is_quantizable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1)


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``root``'s submodule ``name`` (a dotted path)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def groups_of(block: nn.Module, *specs) -> list[Group]:
    """Build groups from ``(names, kwargs)`` specs, dropping members the block lacks."""
    out = []
    for names, kw in specs:
        names = present(block, *names)
        if names:
            out.append(Group(names, **kw))
    return out


def generic_adapter(model: nn.Module, include=("*",), exclude=()) -> Adapter:
    """Any module tree: every ``nn.Linear`` / 1×1 conv whose full name matches ``include`` and no ``exclude``
    pattern (shell-style, e.g. ``"blocks.*.mlp.*"``) is quantized on its own, from one calibration pass."""
    names = [
        n for n, m in model.named_modules()
        if n and isinstance(m, QUANTIZABLE) and is_quantizable(m)
        and any(fnmatch.fnmatchcase(n, p) for p in include)
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]

    def groups(block):
        return [Group((n,)) for n in names]

    return Adapter("generic", (), (), groups)
