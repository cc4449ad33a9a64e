"""Two-level INT4 (or INT8) weights × INT8 / two-level A4 activations on CUDA: activation kernel + INT8 GEMM."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ...formats import get_format, pack_4bit_halves
from .. import library, reference
from ..branch import assign_branch, branch_sources, padded_branch, stacked_branch
from ..runner import Gpu, Runner, activation_group

# Hopper's tensor memory accelerator: the GEMM reads its tiles through TMA descriptors, in a persistent grid
TMA_CAPABILITY = (9, 0)
# H100 / H200 exactly: the CuTe DSL GEMM's warpgroup MMAs are sm_90a's (Blackwell has none)
SM90 = (9, 0)


class Int8Runner(Runner):
    """Two-level INT4 (or INT8) weights × INT8 / two-level A4 activations: activation kernel + INT8 GEMM.

    Weight modes: "speed" (default) expands ``code · m`` to INT8 once here and drops the
    packed copy (``owns_packed_weight``); "memory" keeps the 4-bit codes and expands per call. Both stack.
    """

    fuses_gelu = True  # a layer's output_gelu runs in the GEMM's epilogue (fp32, before the 16-bit rounding)
    quantizes_in_graph = True  # A8 under torch.compile (act_in_graph)
    stacks = True  # q/k/v of one attention: one activation pass, one GEMM
    fuses_input_gelu = True  # a layer's input_gelu_from runs in its activation pass

    @classmethod
    def build(cls, m, gpu: Gpu) -> "Int8Runner":
        sms = torch.cuda.get_device_properties(gpu.device).multi_processor_count
        return cls(m, gpu.kernels, tma=gpu.capability >= TMA_CAPABILITY, num_sms=sms,
                   sm90=gpu.capability == SM90 and gpu.kernels.cutlass_available())

    def __init__(self, m, kernels, *, tma: bool, num_sms: int, sm90: bool = False):
        self.kernels = kernels
        self.tma = tma
        self.sm90 = sm90  # the CUTLASS GEMM where it applies (svdquant.kernels.cutlass_launch)
        self.gelu = bool(getattr(m, "output_gelu", False))
        self.input_gelu_from = getattr(m, "input_gelu_from", None)
        # A8 under torch.compile: quantize in torch ops that inductor fuses into x's producer (set_compiled_activations)
        self.act_in_graph = bool(getattr(m, "compiled_activations", False))
        self.config = kernels.int8_tile_config(tma)  # the weight descriptor's tiles
        self.num_programs = num_sms if tma else None
        wf = get_format(m.weights)
        self.a4 = activation_group(m) > 0
        self.shift = m.act_shift if self.a4 else 0.0
        self.unsigned_from = m.act_unsigned_from
        self.sinv = m.smooth_inv
        self.set_branch(m)
        self.bias = m.bias
        self.w_scale = m.wscales.float().contiguous()
        self.pad_columns()
        self.group = m.group_size if wf.packed else 64
        self.k = m.in_features
        self.kp = self.k + (-self.k) % self.group
        self.w = self.packed = self.mult = self.w_desc = None
        self.parts = None  # a memory-mode stack: its layers' (packed codes, multipliers), expanded per call
        self.owns_packed_weight = False
        self.mode = "memory" if (wf.packed and m.weight_mode == "memory") else "speed"
        if wf.packed:
            self.mult = m.wmult
            if self.mode == "speed":
                self.w = kernels.expand_int4m(m.packed_weight(), self.mult, group_size=self.group)
                self.owns_packed_weight = True
            else:
                self.packed = m.packed_weight()
        else:  # int8 weights: zero-pad K to the activation kernel's padded width
            self.w = F.pad(m.qweight, (0, self.kp - self.k)).contiguous()
        if self.w is not None and tma:
            self.w_desc = kernels.weight_descriptor(self.w, self.config)

    def pad_columns(self) -> None:
        """``w_scale`` and the bias as the GEMMs read them: on sm_90 zero-padded to whole tiles once, here (the
        CUTLASS epilogue reads them without bounds checks; the Triton kernel masks by N, so it reads them too).
        ``w_scale`` / ``bias`` stay the layer's own, for stacking."""
        pad = self.kernels.cutlass_pad_columns if self.sm90 else (lambda t: t)
        self.w_scale_gemm = pad(self.w_scale)
        self.bias_gemm = None if self.bias is None else pad(self.bias)

    def set_branch(self, m) -> bool:
        own = getattr(m, "lora_up", None)
        self.branch16 = own is not None and own.dtype in (torch.bfloat16, torch.float16)  # a 16-bit model's layer
        return assign_branch(self, *self._for_gemm(*padded_branch(m)), branch_sources(m))

    def _for_gemm(self, down, up):
        """The branch as the GEMM reads it: in a 16-bit model on sm_90, the up projection in bf16, the CUTLASS
        GEMM's operand type (a LoRA's fp32 up, an fp16 model's; a bf16 one is the layer's own tensor, not copied).
        The copy keeps its dtype across LoRA strength changes, so :func:`assign_branch` rewrites it in place
        (graph-safe). An fp32 model's layers run the Triton GEMM and keep theirs."""
        if self.sm90 and self.branch16 and up is not None and up.dtype != torch.bfloat16:
            up = up.to(torch.bfloat16)
        return down, up

    @classmethod
    def stack(cls, runners: list["Int8Runner"], out_features: list[int]) -> "Int8Runner":
        """One runner over the output rows of runners that read the same input with the same λ (q/k/v of one
        attention): one activation pass and one GEMM instead of one each. Speed mode: the members are then rebound
        to row views of its INT8 weight (:meth:`view_rows`), so nothing is held twice. Memory mode: it expands
        the members' own 4-bit codes into one INT8 operand per call (:func:`~svdquant.ops.library.expand_rows`):
        the codes stay in the layers' buffers."""
        new = cls._stacked(runners, out_features)
        if new.mode == "speed":
            start = 0
            for r, n in zip(runners, out_features):
                r.view_rows(new, start, start + n)
                start += n
        return new

    @classmethod
    def _stacked(cls, runners: list["Int8Runner"], out_features: list[int]) -> "Int8Runner":
        first = runners[0]
        for r in runners:
            if r.mode != first.mode:
                raise ValueError("layers stack only in one weight mode")
            if (r.w if r.mode == "speed" else r.packed) is None:
                raise ValueError("a layer without its weight (not prepared) does not stack")
            if (r.a4, r.shift, r.unsigned_from, r.group, r.k, r.tma) != (
                    first.a4, first.shift, first.unsigned_from, first.group, first.k, first.tma) \
                    or not torch.equal(r.sinv, first.sinv):
                raise ValueError("layers stack only when they read the same input with the same smoothing "
                                 "and activation format (one shared-input group)")
        new = copy.copy(first)
        if first.mode == "speed":
            new.w = torch.cat([r.w for r in runners], 0)
        else:  # the layers' own tensors (their modules' buffers), not copies
            new.packed, new.parts = None, (tuple(r.packed for r in runners), tuple(r.mult for r in runners))
        new.mult = None  # speed mode: only packed_weight() reads it, and the members give back their own codes
        new.w_scale = torch.cat([r.w_scale for r in runners], 0)
        some = next((r.bias for r in runners if r.bias is not None), None)
        if some is not None:  # a layer without a bias adds zeros (in the others' dtype)
            new.bias = torch.cat([r.bias if r.bias is not None else some.new_zeros(n)
                                  for r, n in zip(runners, out_features)], 0)
        new.out_features = list(out_features)
        new.pad_columns()
        new.restack_branch(runners)
        new.owns_packed_weight = False
        new.w_desc = new.kernels.weight_descriptor(new.w, new.config) if new.tma and new.w is not None else None
        return new

    def restack_branch(self, runners) -> bool:
        members = tuple(t for r in runners for t in (r.down, r.up) if t is not None)
        branch = stacked_branch([(r.down, r.up) for r in runners], self.out_features)
        return assign_branch(self, *self._for_gemm(*branch), members)

    def view_rows(self, fused: "Int8Runner", start: int, stop: int) -> None:
        """Hold rows ``start:stop`` of ``fused``'s INT8 weight instead of an own copy (a contiguous view)."""
        self.w = fused.w[start:stop]
        self.w_desc = self.kernels.weight_descriptor(self.w, self.config) if self.tma else None

    def packed_weight(self) -> torch.Tensor:
        """Speed mode's 4-bit codes again, from ``code · m`` (exact: m divides it)."""
        n = self.w.shape[0]
        codes = self.w.view(n, -1, self.group).to(torch.int16) // self.mult.to(torch.int16).unsqueeze(-1)
        return pack_4bit_halves(codes.to(torch.int8).reshape(n, -1), self.group)

    def __call__(self, x2, tail2=None):
        # Both calls compute the same; the compiled graph needs the opaque op, eager skips the dispatcher.
        if self.parts is not None:  # a memory-mode stack: one INT8 operand from its layers' codes
            expand = torch.ops.svdquant.expand_rows if torch.compiler.is_compiling() else library.expand_rows_impl
            w, mult = expand(*self.parts, self.group), None
        elif self.w is not None:
            w, mult = self.w, None
        else:
            w, mult = self.packed, self.mult
        if torch.compiler.is_compiling() and self.act_in_graph and not self.a4:
            # inductor writes the concatenation and the GELU from the producers' kernels
            if self.input_gelu_from is not None:
                x2 = reference.gelu_columns(x2, tail2, self.input_gelu_from)
            elif tail2 is not None:
                x2 = torch.cat([x2, tail2], -1)
            a, a_s, lora_act = reference.int8_activations(x2, self.sinv, self.down, self.kp)
            return torch.ops.svdquant.int8_gemm(a, a_s, lora_act, self.up, self.bias_gemm, w, mult, self.w_scale_gemm,
                                                self.group, self.tma, self.num_programs or 0, self.gelu, x2.dtype,
                                                self.sm90)
        args = (x2, self.sinv, self.down, self.up, self.bias_gemm, w, mult, self.w_scale_gemm, self.a4, self.group,
                self.shift, self.unsigned_from, self.tma, self.num_programs or 0, self.gelu, tail2,
                self.input_gelu_from, self.sm90)
        if torch.compiler.is_compiling():
            return torch.ops.svdquant.int8_linear(*args)
        return library.int8_linear_impl(*args, w_desc=self.w_desc)

    def call_concat(self, head2, tail2):  # the activation pass reads [head | tail] from both tensors
        return self(head2, tail2)
