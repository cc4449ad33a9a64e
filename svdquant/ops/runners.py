"""Runners: a quantized linear's forward with everything prepared, one class per path.

Each is built by :func:`svdquant.ops.prepare` from a layer's buffers and holds
kernel-ready tensors (transposed scales, a power-of-two-rank branch, INT8 weights...);
``__call__(x2)`` maps ``[M, K]`` to ``[M, N]`` and does nothing but compute.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..formats import get_format, pack_4bit_halves, product_kind
from ..formats.int4 import shift_vector
from . import library, reference


def _pow2_rank(r: int) -> int:
    p = 16
    while p < r:
        p *= 2
    return p


def padded_branch(m):
    """The branch (with LoRAs) padded to a power-of-two rank >= 16 for ``tl.dot`` (zero rows add nothing)."""
    down, up = m.branch()
    if down is None:
        return None, None
    r = down.shape[0]
    rp = _pow2_rank(r)
    if rp == r:  # the usual rank 32: the layer's own tensors (a padded copy would add ~0.26 GB to FLUX)
        return down.contiguous(), up.contiguous()
    down_p = torch.zeros(rp, m.in_features, dtype=down.dtype, device=down.device)
    down_p[:r] = down
    up_p = torch.zeros(m.out_features, rp, dtype=up.dtype, device=up.device)
    up_p[:, :r] = up
    return down_p, up_p


def assign_branch(runner, down, up, sources=()) -> bool:
    """Give ``runner`` the branch ``(down, up)``. Where it holds tensors of its own of the same shapes (a LoRA
    strength change), they are rewritten in place, so a CUDA graph or compiled code that reads them stays valid;
    ``sources`` are tensors that belong to others (the layer's buffers, stacked members' branches) and are never
    written. Returns True if the runner now holds other tensors than before."""
    replaced = False
    for name, new in (("down", down), ("up", up)):
        cur = getattr(runner, name, None)
        if cur is new and hasattr(runner, name):
            continue
        if cur is not None and new is not None and cur.shape == new.shape and cur.dtype == new.dtype and \
                cur.device == new.device and not any(cur is s for s in sources):
            with torch.no_grad():
                cur.copy_(new)
            continue
        setattr(runner, name, new)
        replaced = True
    return replaced


def _sources(m) -> tuple:
    return tuple(t for t in (getattr(m, "lora_down", None), getattr(m, "lora_up", None)) if t is not None)


def stacked_branch(branches, out_features):
    """One branch for layers that read the same input, stacked by output rows: exact.

    ``branches``: each layer's padded ``(down [R_i, K], up [N_i, R_i])`` or ``(None, None)``; ``out_features``:
    each layer's N_i. Layers of one shared-input group share their down projection (one λ, one branch): then it is kept once and the ups
    are stacked. With per-layer LoRAs the downs differ: they are stacked too and the up is block diagonal
    (each layer's rows see only its own ranks), padded to a power-of-two rank."""
    live = [(d, u) for d, u in branches if d is not None]
    if not live:
        return None, None
    if len(live) == len(branches) and all(torch.equal(d, live[0][0]) for d, _ in live):
        ups = [u for _, u in live]
        same = all(u.dtype == ups[0].dtype for u in ups)
        return live[0][0], torch.cat(ups if same else [u.float() for u in ups], 0)
    rank = sum(d.shape[0] for d, _ in live)
    rp = _pow2_rank(rank)
    first = live[0][0]
    down = torch.zeros(rp, first.shape[1], dtype=first.dtype, device=first.device)
    up = torch.zeros(sum(out_features), rp, dtype=torch.float32, device=first.device)
    r0 = n0 = 0
    for (d, u), n in zip(branches, out_features):
        if d is not None:
            down[r0:r0 + d.shape[0]] = d
            up[n0:n0 + n, r0:r0 + d.shape[0]] = u.float()
            r0 += d.shape[0]
        n0 += n
    return down, up


def _act_group(m) -> int:
    return 0 if get_format(m.activations).group_sizes == (0,) else m.group_size


class Unready:
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


class ReferenceRunner:
    """The torch reference (:mod:`svdquant.ops.reference`): CPU, and any GPU path without a kernel.

    The layer's buffers are read live (a CPU layer filled by hand runs without a ``refresh()``). Outside memory mode
    the unpacked weight and what the product multiplies (:func:`~svdquant.ops.reference.weight_operand`: INT8
    values, 1 byte per weight, or fp32 grouped values for NVFP4 / float-scale INT4, 4 bytes) are kept between
    calls and rebuilt only when a buffer was written since (its ``_version`` moved): unpacking the 4-bit codes on
    every call cost a quantized tiny-model step as much as its products, NVFP4 three times as much. They are
    built at the first call, so a model loaded on the CPU on its way to a GPU never holds them."""

    def __init__(self, m):
        self.wf = get_format(m.weights)
        self.af = get_format(m.activations) if m.activations is not None else None
        self.buffers = m.weight_buffers()
        self.group, self.k = m.group_size, m.in_features
        self.keep_weight = m.weight_mode != "memory"
        self._weight, self._versions = None, None
        self.set_branch(m)
        self.bias = m.bias
        if self.af is not None:
            self.act_group = _act_group(m)
            self.sinv = m.smooth_inv
            self.shift, self.unsigned_from = m.act_shift, m.act_unsigned_from
            self.input_scale = getattr(m, "input_scale", None)

    def set_branch(self, m) -> bool:
        """A LoRA was added, rescaled or removed: only the branch changes (in place where it can, see
        :func:`assign_branch`; True if the runner now holds other tensors)."""
        return assign_branch(self, *m.branch(), _sources(m))

    def weight(self):
        """``(QTensor, what the product multiplies)`` of the current buffers."""
        if torch.compiler.is_compiling():  # a traced graph recomputes it (version counters cannot be guarded on)
            wq = self.wf.from_buffers(self.buffers, self.group, self.k)
            return wq, (reference.weight_operand(wq, self.af.name) if self.af is not None else None)
        versions = tuple(b._version for b in self.buffers.values())
        if self._weight is not None and versions == self._versions:
            return self._weight
        wq = self.wf.from_buffers(self.buffers, self.group, self.k)
        operand = reference.weight_operand(wq, self.af.name) if self.af is not None else None
        if self.keep_weight:
            self._weight, self._versions = (wq, operand), versions
        return wq, operand

    def __call__(self, x2):
        wq, operand = self.weight()
        if self.af is None:
            w = self.wf.dequantize(wq, x2.dtype)
            return reference.weight_only_linear(x2, w, self.down, self.up, self.bias)
        qin = reference.quantize_input(x2, self.sinv, self.down, self.af.name, self.act_group, self.shift,
                                       self.input_scale, self.unsigned_from)
        return reference.qgemm(qin, wq, self.up, self.bias, x2.dtype, w_operand=operand)


class CpuRunner(ReferenceRunner):
    """Quantized activations on the CPU whose format has an :meth:`~svdquant.formats.Format.operand` (INT8, two-level
    INT4, NVFP4): the reference's numbers in fewer passes. The activations are quantized straight into the fp32
    values the reference multiplies (exact integers, or E2M1 values × E4M3 scales), with no codes built and read
    back; an integer product is :func:`~svdquant.ops.reference.int8_dot_float`'s exact float32 sums; scales,
    branch and bias follow in :func:`~svdquant.ops.reference.qgemm`'s order (the branch added into the product by
    the BLAS, which may round its last bit differently). A quarter to half the time of the reference per layer on
    a 2-core CPU."""

    def __init__(self, m):
        super().__init__(m)
        self.kind = product_kind(m.weights, m.activations)
        # a shift on only the post-GELU channels: its vector made once, not per call
        mixed = bool(self.shift and self.unsigned_from)
        self.shift_vec = shift_vector(self.k, self.shift, self.unsigned_from, self.sinv.device) if mixed else None

    def __call__(self, x2):
        wq, w = self.weight()
        k = self.k
        if self.shift_vec is not None:
            u = (x2.float() + self.shift_vec) * self.sinv
            unsigned = self.unsigned_from
        else:
            u = ((x2.float() + self.shift) if self.shift else x2.float()) * self.sinv
            unsigned = bool(self.shift)
        a, a_s, a_ts = self.af.operand(u, self.act_group, unsigned=unsigned, tensor_scale=self.input_scale)
        if self.kind == "integer":
            acc = reference.int8_dot_float(a[:, :k], w[0][:, :k]).mul_(a_s).mul_(w[1][None, :])
        else:  # grouped
            acc = a @ w.T
            if wq.tensor_scale is not None:
                acc *= a_ts * wq.tensor_scale
        if self.down is not None:  # into acc: a fresh [M, N] product would cost as much as the main one
            acc.addmm_(x2.float() @ self.down.float().T, self.up.float().T)
        if self.bias is not None:
            acc += self.bias.float()
        return acc.to(x2.dtype)


class Int8Runner:
    """Two-level INT4 (or INT8) weights × INT8 / two-level A4 activations: activation kernel + INT8 GEMM.

    Weight modes: "speed" (default) expands ``code · m`` to INT8 once here and drops the
    packed copy (``owns_packed_weight``); "memory" keeps the 4-bit codes and expands per call.
    """

    fuses_gelu = True  # a layer's output_gelu runs in the GEMM's epilogue (fp32, before the 16-bit rounding)

    def __init__(self, m, kernels, *, tma: bool, num_sms: int):
        self.kernels = kernels
        self.tma = tma
        self.gelu = bool(getattr(m, "output_gelu", False))
        # A8 under torch.compile: quantize in torch ops that inductor fuses into x's producer (set_compiled_activations)
        self.act_in_graph = bool(getattr(m, "compiled_activations", False))
        self.config = dict(kernels.HOPPER_CONFIG if tma else kernels.DEFAULT_CONFIG)
        self.num_programs = num_sms if tma else None
        wf = get_format(m.weights)
        self.a4 = _act_group(m) > 0
        self.shift = m.act_shift if self.a4 else 0.0
        self.unsigned_from = m.act_unsigned_from
        self.sinv = m.smooth_inv
        self.set_branch(m)
        self.bias = m.bias
        self.w_scale = m.wscales.float().contiguous()
        self.group = m.group_size if wf.packed else 64
        self.k = m.in_features
        self.kp = self.k + (-self.k) % self.group
        self.w = self.packed = self.mult = self.w_desc = None
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

    def set_branch(self, m) -> bool:
        return assign_branch(self, *padded_branch(m), _sources(m))

    @classmethod
    def stacked(cls, runners: list["Int8Runner"], out_features: list[int]) -> "Int8Runner":
        """One runner over the output rows of speed-mode runners that read the same input with the same λ
        (q/k/v of one attention): one activation pass and one GEMM instead of one each. The members are
        then rebound to row views of its INT8 weight (:meth:`view_rows`), so nothing is held twice."""
        first = runners[0]
        for r in runners:
            if r.w is None or r.mode != "speed":
                raise ValueError("only speed-mode INT8 runners stack (memory mode expands per layer)")
            if (r.a4, r.shift, r.unsigned_from, r.group, r.k, r.tma) != (
                    first.a4, first.shift, first.unsigned_from, first.group, first.k, first.tma) \
                    or not torch.equal(r.sinv, first.sinv):
                raise ValueError("layers stack only when they read the same input with the same smoothing "
                                 "and activation format (one shared-input group)")
        new = copy.copy(first)
        new.w = torch.cat([r.w for r in runners], 0)
        new.w_scale = torch.cat([r.w_scale for r in runners], 0)
        new.mult = None  # only packed_weight() reads it, and the members give back their own codes
        some = next((r.bias for r in runners if r.bias is not None), None)
        if some is not None:  # a layer without a bias adds zeros (in the others' dtype)
            new.bias = torch.cat([r.bias if r.bias is not None else some.new_zeros(n)
                                  for r, n in zip(runners, out_features)], 0)
        new.out_features = list(out_features)
        new.set_stacked_branch(runners)
        new.owns_packed_weight = False
        new.w_desc = new.kernels.weight_descriptor(new.w, new.config) if new.tma else None
        return new

    def set_stacked_branch(self, runners) -> bool:
        members = tuple(t for r in runners for t in (r.down, r.up) if t is not None)
        return assign_branch(self, *stacked_branch([(r.down, r.up) for r in runners], self.out_features), members)

    def view_rows(self, fused: "Int8Runner", start: int, stop: int) -> None:
        """Hold rows ``start:stop`` of ``fused``'s INT8 weight instead of an own copy (a contiguous view)."""
        self.w = fused.w[start:stop]
        self.w_desc = self.kernels.weight_descriptor(self.w, self.config) if self.tma else None

    def packed_weight(self) -> torch.Tensor:
        """Speed mode's 4-bit codes again, from ``code · m`` (exact: m divides it)."""
        n = self.w.shape[0]
        codes = self.w.view(n, -1, self.group).to(torch.int16) // self.mult.to(torch.int16).unsqueeze(-1)
        return pack_4bit_halves(codes.to(torch.int8).reshape(n, -1), self.group)

    def __call__(self, x2):
        # Both calls compute the same; the compiled graph needs the opaque op, eager skips the dispatcher.
        speed = self.w is not None
        w, mult = (self.w, None) if speed else (self.packed, self.mult)
        if torch.compiler.is_compiling() and self.act_in_graph and not self.a4:
            a, a_s, lora_act = reference.int8_activations(x2, self.sinv, self.down, self.kp)
            return torch.ops.svdquant.int8_gemm(a, a_s, lora_act, self.up, self.bias, w, mult, self.w_scale,
                                                self.group, self.tma, self.num_programs or 0, self.gelu, x2.dtype)
        args = (x2, self.sinv, self.down, self.up, self.bias, w, mult, self.w_scale, self.a4, self.group, self.shift,
                self.unsigned_from, self.tma, self.num_programs or 0, self.gelu)
        if torch.compiler.is_compiling():
            return torch.ops.svdquant.int8_linear(*args)
        return library.int8_linear_impl(*args, w_desc=self.w_desc)


class DenseRunner:
    """A quantized layer computed as one 16-bit cuBLAS linear, for shapes where that measures faster on this GPU
    (``svdquant.optimize``'s layer choice: few tokens, narrow layers): ``W = Q(R)·diag(λ⁻¹) + L2·L1`` (LoRAs
    included) and ``b = b' + Q(R)·(s·λ⁻¹)`` (the post-GELU shift the bias compensated), both in the layer's
    dtype. The same layer minus the activation rounding: at least as close to the 16-bit model. Holds 2 bytes
    per weight; the layer keeps its packed 4-bit codes for checkpoints. A LoRA change rebuilds ``W`` in place."""

    def __init__(self, m):
        self.weight, self.bias = None, None
        self.set_branch(m)

    def set_branch(self, m) -> bool:
        wf = get_format(m.weights)
        w = wf.dequantize(wf.from_buffers(m.weight_buffers(), m.group_size, m.in_features), torch.float32)
        w = w[:, : m.in_features]
        bias = m.bias.float() if m.bias is not None else None
        if m.activations is not None:
            shift = shift_vector(m.in_features, m.act_shift, m.act_unsigned_from, w.device) * m.smooth_inv
            if m.act_shift:
                bias = (w @ shift) + (bias if bias is not None else 0.0)
            w = w * m.smooth_inv
        down, up = m.branch()
        if down is not None:
            w = w.addmm_(up.float(), down.float())
        w = w.to(m.dtype)
        bias = bias.to(m.dtype) if bias is not None else None
        if self.weight is not None and self.weight.shape == w.shape and (self.bias is None) == (bias is None):
            with torch.no_grad():  # in place: a captured CUDA graph keeps reading the same memory
                self.weight.copy_(w)
                if bias is not None:
                    self.bias.copy_(bias)
            return False
        self.weight, self.bias = w.contiguous(), bias
        return True

    @classmethod
    def stacked(cls, runners: list["DenseRunner"]) -> "DenseRunner":
        """One GEMM over the members' rows (q/k/v); the members then hold row views of it."""
        new = cls.__new__(cls)
        new.weight = torch.cat([r.weight for r in runners], 0)
        biases = [r.bias for r in runners]
        some = next((b for b in biases if b is not None), None)
        new.bias = None if some is None else torch.cat(
            [b if b is not None else some.new_zeros(r.weight.shape[0]) for b, r in zip(biases, runners)], 0)
        start = 0
        for r in runners:
            n = r.weight.shape[0]
            r.weight = new.weight[start:start + n]
            if new.bias is not None:
                r.bias = new.bias[start:start + n]
            start += n
        return new

    def __call__(self, x2):
        if x2.dtype != self.weight.dtype:  # a layer made in another dtype than it now reads (model.to(dtype))
            return F.linear(x2, self.weight.to(x2.dtype), self.bias.to(x2.dtype) if self.bias is not None else None)
        return F.linear(x2, self.weight, self.bias)


class FloatScalesRunner:
    """The paper's formats with float group scales: INT4 W4A4 and NVFP4 (quantize kernel + grouped GEMM)."""

    PAIRS = (("int4", "int4"), ("nvfp4", "nvfp4"))

    def __init__(self, m, kernels):
        self.kernels = kernels
        self.fp4 = m.weights == "nvfp4"
        self.qweight = m.qweight
        self.wscales = m.wscales if self.fp4 else m.wscales.t().contiguous()
        self.wtensor_scale = getattr(m, "wtensor_scale", None)
        self.input_scale = getattr(m, "input_scale", None)
        self.sinv, self.group = m.smooth_inv, m.group_size
        self.shift, self.unsigned_from = m.act_shift, m.act_unsigned_from
        self.set_branch(m)
        self.bias = m.bias

    def set_branch(self, m) -> bool:
        return assign_branch(self, *padded_branch(m), _sources(m))

    def __call__(self, x2):
        args = (x2, self.sinv, self.down, self.up, self.bias, self.qweight, self.wscales, self.wtensor_scale,
                self.input_scale, self.fp4, self.group, self.shift, self.unsigned_from)
        if torch.compiler.is_compiling():
            return torch.ops.svdquant.float_scales_linear(*args)
        return library.float_scales_linear_impl(*args)


class W4A16Runner:
    """Weight-only INT4 on CUDA: the memory-bound W4A16 kernel for up to 16 tokens; beyond, the weight is
    dequantized by a kernel into a fresh 16-bit buffer for cuBLAS (the reference's numerics, one pass)."""

    FORMATS = ("int4", "int4z")

    def __init__(self, m, kernels):
        self.kernels = kernels
        self.qweight, self.wscales, self.bias = m.qweight, m.wscales, m.bias
        self.wzeros = getattr(m, "wzeros", None)  # int4z: AWQ's zero points
        self.set_branch(m)
        self.group, self.k = m.group_size, m.in_features

    def set_branch(self, m) -> bool:
        return assign_branch(self, *m.branch(), _sources(m))

    def __call__(self, x2):
        if x2.shape[0] > self.kernels.W4A16_MAX_TOKENS:
            # compute-bound: one pass writes the 16-bit weight (what the reference dequantizes), then cuBLAS
            if torch.compiler.is_compiling():
                w = torch.ops.svdquant.dequantize_int4(self.qweight, self.wscales, self.wzeros, self.k, x2.dtype,
                                                       self.group)
            else:
                w = self.kernels.dequantize_int4(self.qweight, self.wscales, self.k, x2.dtype, zeros=self.wzeros,
                                                 group_size=self.group)
            return reference.weight_only_linear(x2, w, self.down, self.up, self.bias)
        if torch.compiler.is_compiling():
            y = torch.ops.svdquant.w4a16_linear(x2, self.qweight, self.wscales, self.bias, self.wzeros, self.group)
        else:
            y = self.kernels.w4a16_linear(x2.contiguous(), self.qweight, self.wscales, self.bias, zeros=self.wzeros,
                                          group_size=self.group)
        if self.down is not None:
            y = y + ((x2.float() @ self.down.float().T) @ self.up.float().T).to(y.dtype)
        return y


class Fp8ScaledMMRunner:
    """FP8 row-wise W8A8 on cuBLAS (``torch._scaled_mm``): the recipe users run on Hopper, behind the same module."""

    def __init__(self, m):
        self.qweight_t = m.qweight.t()
        self.w_scale = m.wscales.float()[None, :]
        self.sinv = m.smooth_inv
        self.bias = m.bias
        self.reference = ReferenceRunner(m)
        self.set_branch(m)
        self.fp8 = get_format("fp8")

    def set_branch(self, m) -> bool:
        replaced = assign_branch(self, *m.branch(), _sources(m))
        return self.reference.set_branch(m) or replaced

    def __call__(self, x2):
        if x2.dtype not in (torch.bfloat16, torch.float16):
            return self.reference(x2)
        q = self.fp8.quantize(x2.float() * self.sinv, check=False)
        y = torch._scaled_mm(q.codes, self.qweight_t, scale_a=q.scales.float()[:, None], scale_b=self.w_scale,
                             out_dtype=x2.dtype)
        if self.down is not None:
            y = y + ((x2.float() @ self.down.float().T) @ self.up.float().T).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y
