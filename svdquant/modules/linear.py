"""``SVDQLinear``: the drop-in replacement for ``nn.Linear``.

Stored (all as buffers, so ``state_dict`` holds exactly what a checkpoint needs); the weight
buffers come from the weight format's record (:meth:`svdquant.formats.Format.weight_buffers`):

| buffer        | shape              | dtype                         | what                                |
| ------------- | ------------------ | ----------------------------- | ----------------------------------- |
| qweight       | [N, K_pad/2]       | uint8, 2 codes/byte (*)       | Q(R) for int4m / int4 / nvfp4 / nf4 |
|               | [N, K]             | int8 / float8_e4m3fn          | Q(R) for int8 / fp8                 |
| wmult         | [N, K_pad/g]       | uint8                         | int4m: integer group multipliers    |
| wscales       | [N]                | fp32                          | int4m / int8 / fp8: row scales      |
|               | [N, K_pad/g]       | model dtype (int4), e4m3 (nvfp4), fp32 (nf4) | group scales         |
| wtensor_scale | []                 | fp32                          | NVFP4 per-tensor weight scale       |
| input_scale   | []                 | fp32                          | NVFP4 static activation tensor scale|
| smooth_inv    | [K]                | fp32                          | 1/λ (stored inverted: kernels multiply) |
| lora_down     | [rank, K]          | model dtype                   | L1 (already divided by λ)           |
| lora_up       | [N, rank]          | model dtype                   | L2                                  |
| bias          | [N]                | model dtype (or ``bias_dtype``) | b' (post-GELU shift compensated)  |

(*) within each group of g codes, byte j holds code j (low nibble) and code j + g/2
(high nibble): :func:`~svdquant.formats.pack_4bit_halves`.

Scalars (``act_shift``, formats, sizes) are constructor arguments; :meth:`config`
returns them so a checkpoint can rebuild the module before loading its tensors.

What runs: :func:`svdquant.ops.prepare` picks the path for the layer's formats and device (a fused kernel,
``torch._scaled_mm`` or the torch reference) and builds its kernel-ready tensors once, whenever the layer is built,
loaded, moved (``.to``) or given a new weight mode. Offload hooks move tensors without ``.to`` (diffusers' group
offloading assigns ``.data``, accelerate's hooks replace buffers): ``forward`` notices that its buffers are other
tensors, or on another device, than the runner was made from, and prepares again. A LoRA change rebuilds only the
branch, at the next call, when the tensors are back on the device that runs it.

Weight modes (GPU kernels of the INT8 path): ``"speed"`` expands the 4-bit codes once into INT8 ``code ×
multiplier`` (1 byte per weight resident; the packed copy is dropped from the device and rebuilt when the state dict
is read), ``"memory"`` keeps 4-bit codes resident and expands each layer right before its GEMM (the q/k/v that
:func:`svdquant.fuse` stacks, together). ``"auto"`` is speed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.reference import gelu_columns
from ..formats import get_format
from .lora_linear import AdapterSet
from ..recipes import QuantConfig, get_recipe

WEIGHT_MODES = ("auto", "speed", "memory")

_revision = 0


def revision() -> int:
    """Counts the changes to what quantized layers run: a runner rebuilt (load, ``.to``, weight mode, fuse) or a
    branch replaced by other tensors (a LoRA added or removed; a strength change rewrites it in place and does not
    count). A CUDA graph captured before a change would replay the old tensors: ``svdquant.optimize``'s graphs
    are captured again after one."""
    return _revision


def bump_revision() -> None:
    global _revision
    _revision += 1


_pending = 0


def pending_branches() -> int:
    """Counts LoRA changes left for the layers' next call (see ``SVDQLinear._adapters_changed``): a graph cache
    that replays without calling forward applies them first when this moved."""
    return _pending


class SVDQLinear(nn.Module, AdapterSet):
    """``Y ≈ Q((X + s)/λ)·Q(R)ᵀ + (X·L1ᵀ)·L2ᵀ + b'`` for any leading batch shape.

    Build one with :meth:`from_linear` (or :meth:`from_linears` for q/k/v-style groups),
    or construct it empty (``device="meta"`` works) and ``load_state_dict``.
    """

    takes_tail = True  # forward(x, tail=...): the input in two column parts (a FLUX single block's proj_out)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weights: str = "int4m",
        activations: str | None = "int8",
        group_size: int = 64,
        rank: int = 32,
        act_shift: float = 0.0,
        act_unsigned_from: int = 0,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
    ):
        nn.Module.__init__(self)
        AdapterSet.__init__(self)  # LoRAs, concatenated onto the branch (svdquant.lora)
        wf = get_format(weights)
        af = get_format(activations) if activations is not None else None
        if not wf.weight or (af is not None and activations not in wf.pairs_with):
            raise ValueError(f"no quantized linear with W{weights}A{activations or 16}")
        self.in_features, self.out_features = in_features, out_features
        self.weights, self.activations = weights, activations
        self.group_size, self.rank, self.act_shift = group_size, rank, float(act_shift)
        self.act_unsigned_from = int(act_unsigned_from)
        self.dtype = dtype
        # fp32 where an import must keep a bias its 16-bit form cannot hold (Nunchaku's adaLN scale biases less the
        # folded 1); every runner adds the bias in fp32 or casts it to the output dtype, as with a 16-bit one
        self.bias_dtype = bias_dtype if bias_dtype not in (None, dtype) else None
        self.quant_report = None
        self.weight_mode = "auto"
        # tanh-GELU on the output (set_output_gelu): the INT8 runner applies it in its GEMM epilogue, others after
        self.output_gelu = False
        self.input_gelu_from = None  # set_input_gelu: an MLP's GELU on this layer's input channels from here on
        # INT8 activations quantized in torch ops under torch.compile, fused by inductor into the producer of the
        # input (set by svdquant.fuse(..., compiled_activations=True)); eager runs are unchanged
        self.compiled_activations = False
        # "dense": run as one 16-bit linear of the dequantized weight (svdquant.optimize's choice where cuBLAS
        # measures faster at the layer's shape on this GPU); a run-time choice, not stored in checkpoints
        self.compute = "quantized"
        self._runner = None
        # the FusedSVDQLinear running this layer with its siblings (svdquant.fuse), see stacked_in; in __dict__,
        # out of nn.Module's registries: the stack is not a submodule of its members
        self.__dict__["_stack"] = None
        n, k = out_features, in_features

        def buf(name, shape, dt):
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))

        for name, (shape, dt) in wf.weight_buffers(n, k, group_size, dtype).items():
            buf(name, shape, dt)
        if af is not None and af.static_input_scale:
            buf("input_scale", (), torch.float32)
        if af is not None:
            buf("smooth_inv", (k,), torch.float32)
        if rank > 0:
            buf("lora_down", (rank, k), dtype)
            buf("lora_up", (n, rank), dtype)
        if bias:
            buf("bias", (n,), self.bias_dtype or dtype)
        else:
            self.bias = None
        self.register_load_state_dict_post_hook(lambda mod, _incompatible: mod.refresh())
        # Fresh buffers hold garbage: a GPU layer is prepared once it is filled (from_quantized,
        # load_state_dict, .to, or refresh() after filling it by hand); the CPU reference reads them live.
        self._runner = ops.EMPTY_ON_GPU if self.wscales.device.type == "cuda" else ops.prepare(self)
        self._prepared_for = (self.wscales, self.wscales.device)
        self._branch_stale = False

    # -- construction --------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw, recipe: QuantConfig, dtype: torch.dtype, report=None) -> "SVDQLinear":
        """Build from :class:`svdquant.algorithm.QuantizedWeights` (what the quantizer's algorithm returns);
        ``report``, the algorithm's :class:`~svdquant.algorithm.LayerReport`, is kept as ``.quant_report``."""
        q = qw.weight
        n, k = q.codes.shape[0], q.in_features
        rank = qw.lora_down.shape[0] if qw.lora_down is not None else 0
        m = cls(k, n, bias=qw.bias is not None, weights=recipe.weights, activations=recipe.activations,
                group_size=recipe.group_size, rank=rank, act_shift=qw.act_shift,
                act_unsigned_from=qw.act_unsigned_from, dtype=dtype, device=q.codes.device)
        with torch.no_grad():
            for name, t in get_format(recipe.weights).to_buffers(q).items():
                getattr(m, name).copy_(t)
            if qw.input_scale is not None:
                m.input_scale.copy_(qw.input_scale)
            if recipe.activations is not None:
                m.smooth_inv.copy_(1.0 / qw.smooth)
            if rank:
                m.lora_down.copy_(qw.lora_down)
                m.lora_up.copy_(qw.lora_up)
            if qw.bias is not None:
                m.bias.copy_(qw.bias)
        m.quant_report = report
        m.refresh()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, inputs, recipe: str | QuantConfig = "int4", *,
                    post_gelu: bool | int = False) -> "SVDQLinear":
        """Quantize ``linear`` from a sample of its inputs (``[..., in_features]``).

        ``post_gelu=True`` marks an input that follows a GELU: INT4 activations are then shifted by +0.171875 and
        quantized unsigned (an int: only channels from that index on). The report of what was chosen and the output
        error is kept in ``.quant_report``."""
        (m,) = cls.from_linears([linear], inputs, recipe, post_gelu=post_gelu)
        return m

    @classmethod
    def from_linears(cls, linears, inputs, recipe: str | QuantConfig = "int4", *, post_gelu: bool | int = False,
                     shared_branch: bool = True, act_max: torch.Tensor | None = None) -> list["SVDQLinear"]:
        """Quantize linears that read the same input (q/k/v) with one λ and, by default, one shared branch.

        A convenience for one group at a time (``svdquant.quantize`` runs :func:`svdquant.algorithm.quantize_linears`
        itself and builds the layers with :meth:`from_quantized`)."""
        from ..algorithm import quantize_linears

        recipe = get_recipe(recipe)
        for lin in linears:
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"expected nn.Linear, got {type(lin).__name__}")
        qws, report = quantize_linears([lin.weight for lin in linears], [lin.bias for lin in linears], inputs,
                                       recipe, post_gelu=post_gelu, shared_branch=shared_branch, act_max=act_max)
        return [cls.from_quantized(qw, recipe, lin.weight.dtype, report) for qw, lin in zip(qws, linears)]

    # -- use -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-friendly) that rebuild an empty module of this layout."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
            "weights": self.weights, "activations": self.activations, "group_size": self.group_size,
            "rank": self.rank, "act_shift": self.act_shift, "act_unsigned_from": self.act_unsigned_from,
            "dtype": str(self.dtype).removeprefix("torch."),
            **({"bias_dtype": str(self.bias_dtype).removeprefix("torch.")} if self.bias_dtype else {}),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any], device=None) -> "SVDQLinear":
        cfg = dict(cfg)
        cfg["dtype"] = getattr(torch, cfg["dtype"])
        if "bias_dtype" in cfg:
            cfg["bias_dtype"] = getattr(torch, cfg["bias_dtype"])
        return cls(**cfg, device=device)

    @property
    def device(self) -> torch.device:
        return self.wscales.device

    def branch(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The low-rank branch as ``(L1 [r, K], L2 [N, r])``, or ``(None, None)`` without one.

        With LoRAs loaded: ``([L1; A_1; A_2 ...], [L2, s_1·B_1, s_2·B_2 ...])``; the up projection
        is then held in fp32 so strengths are exact. Built by :meth:`refresh`, not per call.
        """
        base = (self.lora_down, self.lora_up) if self.rank else (None, None)
        live = [(a, b, s) for a, b, s in self.adapters.values() if s != 0]
        if not live:
            return base
        downs = ([base[0]] if base[0] is not None else []) + [a for a, _, _ in live]
        ups = ([base[1].float()] if base[1] is not None else []) + [s * b for _, b, s in live]
        down = torch.cat([d.to(self.device, self.dtype) for d in downs], 0)
        up = torch.cat([u.to(self.device, torch.float32) for u in ups], 1)
        return down, up

    def add_adapter(self, name, down, up, strength=1.0):
        if down.shape[1] != self.in_features or up.shape[0] != self.out_features:
            raise ValueError(f"adapter {name!r} is {up.shape[0]}x{down.shape[1]}, the layer is "
                             f"{self.out_features}x{self.in_features}")
        super().add_adapter(name, down.to(self.device, self.dtype), up.to(self.device, torch.float32), strength)

    @property
    def stacked_in(self):
        """The :class:`~svdquant.modules.FusedSVDQLinear` that runs this layer with its q/k/v siblings
        (``svdquant.fuse``), or None. It is told of this layer's changes (a refresh, LoRAs, compiled activations)."""
        return self.__dict__.get("_stack")

    def set_stacked_in(self, stack) -> None:
        """Called by the stack that takes this layer in, and with None by the one that lets it go."""
        self.__dict__["_stack"] = stack

    def _adapters_changed(self) -> None:
        stack = self.stacked_in
        if stack is not None:  # stacked with its q/k/v siblings (modules/fused.py): the fused runner needs it now
            replaced = self._runner.set_branch(self)
            self._branch_stale = False
            if stack.refresh_branch() or replaced:
                bump_revision()
            return
        # Only the branch changes: the runner rebuilds it at the next call and keeps its prepared weights.
        # Not now: an offload hook may hold the tensors elsewhere until then (on disk, or on the CPU). A captured
        # CUDA graph never calls forward: svdquant.optimize's graphs apply pending branches before a replay.
        self._branch_stale = True
        global _pending
        _pending += 1

    def _apply_stale_branch(self) -> None:
        """Bring the runner's branch up to the LoRAs changed since it last ran (see _adapters_changed)."""
        if self._branch_stale:
            if self._runner.set_branch(self):
                bump_revision()
            self._branch_stale = False

    def set_output_gelu(self, on: bool) -> None:
        """Apply tanh-GELU to the output (an MLP's up projection fused with its activation, ``svdquant.fuse``):
        in the INT8 GEMM's epilogue where that runs, after the runner elsewhere. No weight is rebuilt."""
        self.output_gelu = bool(on)
        if self._runner.fuses_gelu:
            self._runner.gelu = self.output_gelu
        if self.stacked_in is not None:  # one GEMM for the stack cannot apply one member's GELU: members in turn
            self.stacked_in.refresh()
        bump_revision()

    def set_input_gelu(self, start: int | None) -> None:
        """Apply tanh-GELU to the input's channels from ``start`` on (``None``: off) first: an MLP's GELU moved into
        its down projection (``svdquant.fuse``): in the INT8 activation pass, elsewhere before the runner."""
        if start is not None and not 0 <= int(start) < self.in_features:
            raise ValueError(f"set_input_gelu({start}): the first GELU channel must be in [0, {self.in_features})")
        self.input_gelu_from = None if start is None else int(start)
        if self._runner.fuses_input_gelu:
            self._runner.input_gelu_from = self.input_gelu_from
        if self.stacked_in is not None:
            self.stacked_in.refresh()
        bump_revision()

    def set_compiled_activations(self, on: bool) -> None:
        """Under ``torch.compile``, quantize INT8 activations in torch ops (:func:`svdquant.ops.reference.int8_activations`)
        that inductor fuses into the kernel producing the input, instead of the separate activation kernel. Same
        numbers up to inductor's float rounding; eager calls and other formats are unchanged."""
        self.compiled_activations = bool(on)
        if self._runner.quantizes_in_graph:
            self._runner.act_in_graph = self.compiled_activations
        bump_revision()
        if self.stacked_in is not None:
            self.stacked_in.sync_compiled_activations()

    def set_compute(self, mode: str) -> None:
        """``"quantized"`` (the kernels) or ``"dense"`` (a 16-bit cuBLAS linear of the dequantized weight and branch,
        on CUDA only); see :class:`svdquant.ops.runners.DenseRunner`."""
        if mode not in ("quantized", "dense"):
            raise ValueError(f"compute {mode!r} is unknown; choose 'quantized' or 'dense'")
        if mode != self.compute:
            self.compute = mode
            self.refresh()

    def set_weight_mode(self, mode: str) -> None:
        """``"speed"`` (INT8 codes resident), ``"memory"`` (4-bit resident) or ``"auto"``; see the module doc."""
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weight mode {mode!r} is unknown; choose one of {WEIGHT_MODES}")
        self.weight_mode = mode
        self.refresh()

    def refresh(self) -> None:
        """Rebuild what runs (:func:`svdquant.ops.prepare`): after loading, moving, LoRA or mode changes."""
        self._restore_packed()
        self._runner = ops.prepare(self)
        bump_revision()
        self._prepared_for = (self.wscales, self.wscales.device)
        self._branch_stale = False
        self.drop_owned_packed()
        if self.stacked_in is not None:
            self.stacked_in.refresh()

    def drop_owned_packed(self) -> None:  # the runner holds the weight (INT8 speed mode, a W4A16 stack's rows)
        if self._runner.owns_packed_weight:
            self._buffers["qweight"] = None

    def _restore_packed(self) -> None:
        if "qweight" in self._buffers and self._buffers["qweight"] is None and self._runner is not None:
            self._buffers["qweight"] = self._runner.packed_weight()

    def packed_weight(self) -> torch.Tensor:
        """``qweight`` as stored in checkpoints, rebuilt from the runner's INT8 copy in speed mode."""
        q = self._buffers["qweight"]
        return q if q is not None else self._runner.packed_weight()

    def weight_buffers(self) -> dict[str, torch.Tensor]:
        names = get_format(self.weights).weight_buffers(self.out_features, self.in_features, self.group_size, self.dtype)
        return {n: (self.packed_weight() if n == "qweight" else getattr(self, n)) for n in names}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The 4-bit residual as a dense ``[N, K]`` matrix in the *smoothed* space (i.e. ``Q(R)``)."""
        wf = get_format(self.weights)
        return wf.dequantize(wf.from_buffers(self.weight_buffers(), self.group_size, self.in_features), dtype)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
        """``tail``: the input is ``torch.cat([x, tail], -1)``, read from both tensors where they are by the INT8
        runner (``Runner.call_concat``; a FLUX single block's ``proj_out``: its attention output and the MLP's, a
        column slice of the stacked GEMM's output; the concatenation would read and write the 15,360-wide input)."""
        self._check_input(x, tail)
        self._ready()
        lead, run = x.shape[:-1], self._runner
        if self.input_gelu_from is not None and not run.fuses_input_gelu:
            x, tail = gelu_columns(x, tail, self.input_gelu_from), None
        if tail is None:
            return self._finish(run(x.reshape(-1, self.in_features)), lead)
        return self._finish(run.call_concat(x.reshape(-1, x.shape[-1]), tail.reshape(-1, tail.shape[-1])), lead)

    def _check_input(self, x: torch.Tensor, tail: torch.Tensor | None) -> None:
        if tail is None:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"SVDQLinear expected inputs with last dimension {self.in_features}, got shape "
                                 f"{tuple(x.shape)}")
        elif x.shape[:-1] != tail.shape[:-1] or x.shape[-1] + tail.shape[-1] != self.in_features \
                or not x.shape[-1] or not tail.shape[-1]:
            raise ValueError(f"SVDQLinear expected an input and a tail with the same leading shape whose last "
                             f"dimensions (both > 0) add up to {self.in_features}, got shapes {tuple(x.shape)} and "
                             f"{tuple(tail.shape)}")
        elif x.dtype != tail.dtype or x.device != tail.device:
            raise ValueError(f"SVDQLinear expected an input and a tail of one dtype on one device, got {x.dtype} on "
                             f"{x.device} and {tail.dtype} on {tail.device}")

    def _ready(self) -> None:
        w, (prepared, device) = self._buffers["wscales"], self._prepared_for
        if w is not prepared or w.device != device:
            # Moved without .to(): diffusers' group offloading assigns each buffer's .data, accelerate's
            # offload hooks replace the buffers; the runner still holds the old tensors (or was made for the
            # other device: the reference on GPU tensors, or CPU LoRA branches next to GPU weights).
            self.refresh()
        else:
            self._apply_stale_branch()

    def _finish(self, y: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        if self.output_gelu and not self._runner.fuses_gelu:
            y = F.gelu(y, approximate="tanh")
        return y.reshape(*lead, self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "qweight" in self._buffers and self._buffers["qweight"] is None:
            destination[prefix + "qweight"] = self.packed_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._restore_packed()  # so that "qweight" is an expected key again
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # The stored dtypes are part of the format (FP8 codes, fp32 1/λ...): `.to(dtype)`
        # or `.half()` on a model must not cast them, only move them between devices. So a call that
        # moves nothing (`pipe.to(device)` after a load onto that device, `.half()`) changes nothing: it
        # must not rebuild the packed codes and re-expand them.
        probe = fn(self.wscales)
        if probe.device == self.wscales.device and (probe.dtype != self.wscales.dtype
                                                    or probe.data_ptr() == self.wscales.data_ptr()):
            return self
        self._restore_packed()
        for name, b in self._buffers.items():
            if b is not None:
                moved = fn(b)
                self._buffers[name] = moved if moved.dtype == b.dtype else b.to(device=moved.device)
        for a in self.adapters.values():
            a[0], a[1] = a[0].to(self.device), a[1].to(self.device)
        self.refresh()
        return self

    def extra_repr(self) -> str:
        act = self.activations or "16-bit"
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"W={self.weights} A={act} group={self.group_size} rank={self.rank}")
        if self.act_shift:
            s += f", shift={self.act_shift} from channel {self.act_unsigned_from}"
        return s
