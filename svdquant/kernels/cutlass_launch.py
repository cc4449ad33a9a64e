"""The Hopper GEMM of :mod:`svdquant.kernels.cutlass_gemm` called from torch: whether it can run, one compile per
epilogue variant, the launch.

``nvidia-cutlass-dsl`` is imported only here and only when asked (:func:`available`), so nothing else of the library
needs it. Each variant (output dtype, branch rank, bias dtype, GELU; the tile and walk :func:`plan` picks for the
shape) compiles once per process and GPU, about 1-2 s, with dynamic M, N and K: the first call of a variant compiles
it, as a Triton kernel's first launch does, then loads and runs it once at a small shape, so a CUDA graph captured
after a warm-up call (as ``svdquant.optimize`` captures) records only the launch. A variant that fails to compile or
load warns once and is not tried again: :func:`int8_gemm_sm90` then returns None and the caller runs the Triton
kernel. A product may run as two launches over row slices (:func:`launches`, behind :data:`SPLIT_TAIL`), each its
own plan's variant.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
import torch.nn.functional as F

TILE = (128, 256)  # the fastest at 11 of FLUX.1's 12 shapes on an H200 without a cluster (BENCHMARKS.md)
SMALL_TILE = (128, 128)  # twice the CTAs, for products too small to fill the GPU with 128 × 256 tiles
# 128 × 128's rate per output element against 128 × 256's when both run whole waves (H100, M = 4,096, N = 3,072:
# 0.92 against 1.09 × FP8, 6 and 3 waves; BENCHMARKS.md, "Issue 23 on an H100")
SMALL_TILE_RATE = 0.85
# An operand this small stays in L2 (50 MB on H100 / H200, two partitions) while the other one's tiles stream past
L2_RESIDENT_BYTES = 24 << 20
# The start of a second launch in 128 × 256 tiles' time: about a wave of them at K = 640 (~4 µs on an H100, where a
# wave at K = 3,072 took ~19.5 µs: the 4,608 × 3,072 × 3,072 product in 0.078 ms, 4 waves; BENCHMARKS.md)
SPLIT_LAUNCH_K = 640
# The least share of one launch's estimated time a second launch must save. On an H100 the splits estimated at
# 0.91-0.95x ran at 0.90-0.95x (CUDA graphs), those at 0.97-1.00x at 0.98-1.09x, inside the timings' noise
# (BENCHMARKS.md, "Session 41"): small gains are not taken
SPLIT_MIN_GAIN = 0.04
# True: the last rows' second launch where :func:`launches` finds one cheaper (checked and timed on an H100: FLUX's
# step at batch 1, 88.5 -> 87.5 ms, before SPLIT_MIN_GAIN). False is the A/B switch back to one launch:
# kernel_speed.py times both, and flux_step.py --gemm-one-launch turns it off for a step
SPLIT_TAIL = True
SWIZZLE = 4  # N tiles per group where neither operand stays in L2: A is swept once per group, not once per tile
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
# 128 at 128 × 128 tiles only (two swizzle rows): at 0.81-1.07x bare FP8 on an H200 where Triton's kernel ran
# 0.67-1.00x (NOTES-GPU.md session 23)
RANKS = (16, 32, 64, 128)

# Call the kernels through apache-tvm-ffi: torch tensors go in directly and the launch takes torch's current stream,
# where the DSL's DLPack views cost ~0.15 ms of host time per call. On an H200 the eager launch at M = 512 went from
# 0.17-0.40x bare FP8 through views to 1.00-1.03x (NOTES-GPU.md session 23). Used where apache-tvm-ffi is installed
# (a dependency on Linux) and torch exports its DLPack exchange API (torch >= 2.10; older torch would make tvm_ffi
# build an extension at import); False is the A/B switch back to views. Read when the DSL is first imported.
TVM_FFI = True
# False: every INT8 GEMM runs Triton's kernel (an A/B switch for benchmarks: quality.py --gemm triton); read when a
# runner is built
ENABLED = True
_STATE: dict = {}  # "dsl": the imported modules or None; per variant key, its compiled kernel or False (failed)


def available() -> bool:
    """Whether ``nvidia-cutlass-dsl`` imports here (asked once per process; a failed import is said once), and
    :data:`ENABLED`."""
    if not ENABLED:
        return False
    if "dsl" not in _STATE:
        try:
            import cuda.bindings.driver as cuda
            import cutlass
            import cutlass.cute as cute
            from cutlass.cute.runtime import from_dlpack

            from . import cutlass_gemm

            _STATE["dsl"] = (cuda, cutlass, cute, from_dlpack, cutlass_gemm)
            _STATE["ffi"] = (TVM_FFI and hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
                             and importlib.util.find_spec("tvm_ffi") is not None)
        except ImportError as e:
            _STATE["dsl"] = None
            warnings.warn(f"nvidia-cutlass-dsl does not import ({e}); the INT8 GEMMs run Triton's kernel, slower on "
                          "H100 / H200: pip install 'nvidia-cutlass-dsl>=4.8.1,<4.9'", stacklevel=2)
    return _STATE["dsl"] is not None


def takes(out_dtype: torch.dtype, lora_up: torch.Tensor | None, bias: torch.Tensor | None, m: int, n: int,
          k: int) -> bool:
    """Whether the kernel computes this product (static facts only, no device query): a 16-bit output and bias, a
    branch of bf16 weights and rank 16 / 32 / 64 / 128 (or none), N a multiple of 8 (TMA's 16-byte rows of Y) and K of
    128 (whole k-tiles: a partial one has not run on a GPU). Any M > 0: partial M and N tiles were checked on an
    H200 (NOTES-GPU.md, session 21)."""
    if out_dtype not in DTYPES or m <= 0 or n % 8 or k % 128:
        return False
    if bias is not None and bias.dtype not in DTYPES:
        return False
    return lora_up is None or (lora_up.dtype == torch.bfloat16 and lora_up.shape[1] in RANKS)


def pad_to(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """A 1-D ``t`` zero-padded to a whole number of tiles: the epilogue reads scales and bias without bounds checks."""
    return t if t.shape[0] % multiple == 0 else F.pad(t, (0, -t.shape[0] % multiple))


def pad_columns(t: torch.Tensor) -> torch.Tensor:
    """A per-column vector (``w_scale``, the bias) padded to whole N tiles: done once at load by the runner, it
    spares the launch two small copies per call where N is not a multiple of 256 (PixArt-Σ's 1,152)."""
    return pad_to(t, TILE[1])


def _waves(m: int, n: int, tile: tuple[int, int], sms: int) -> float:
    """The cost of an [m, n] output in whole waves of one ``tile`` per SM, in 128 × 256 tiles' time."""
    tiles = -(-m // tile[0]) * -(-n // tile[1])
    return -(-tiles // sms) * tile[0] * tile[1] / (1.0 if tile == TILE else SMALL_TILE_RATE) / (TILE[0] * TILE[1])


def _tile(m: int, n: int, sms: int, rank: int) -> tuple[int, int]:
    return SMALL_TILE if rank > 64 else min((TILE, SMALL_TILE), key=lambda t: _waves(m, n, t, sms))


def plan(m: int, n: int, k: int, sms: int, rank: int = 0) -> tuple[tuple[int, int], bool, int]:
    """(tile, raster_m, swizzle) for an [m, k] × [n, k]ᵀ product with a branch of ``rank`` on ``sms`` SMs. The
    persistent grid runs whole waves of one tile per SM: the tile is the one whose waves cost least (128 × 256,
    unless 128 × 128's finer waves win at its lower rate: FLUX's 512-token text stream; always 128 × 128 for a
    branch wider than 64, whose operands would leave 128 × 256 two pipeline stages). The walk keeps one operand in
    L2 and streams the other: down M (W's tile shared by the CTAs at work, A swept once per N tile) where A fits
    L2, else along N where W fits, else down M in groups of :data:`SWIZZLE` N tiles."""
    tile = _tile(m, n, sms, rank)
    if m * k <= L2_RESIDENT_BYTES:
        return tile, True, 1
    if n * k <= L2_RESIDENT_BYTES:
        return tile, False, 1
    return tile, True, SWIZZLE if -(-n // tile[1]) % SWIZZLE == 0 else 1


@functools.lru_cache(maxsize=1024)
def launches(m: int, n: int, k: int, sms: int, rank: int = 0, split: bool = True
             ) -> tuple[tuple[int, tuple[int, int], bool, int], ...]:
    """The product as one launch or two, each ``(rows, tile, raster_m, swizzle)`` (:func:`plan`'s for its rows),
    top rows first. A persistent grid whose last wave is mostly idle wastes that wave: FLUX's single-block
    ``proj_out`` (4,608 × 3,072 outputs) is 432 tiles of 128 × 256, 3.27 waves on 132 SMs, so its fourth wave
    runs 36 tiles while 96 SMs wait. Its first 4,224 rows are 3 whole waves; the last 384 in 128 × 128 tiles are
    72 half-size tiles, one wave at about 0.6 of a big one's time. Two launches are taken where, with the second's
    start (:data:`SPLIT_LAUNCH_K`), they cost at least :data:`SPLIT_MIN_GAIN` less than one and ``split`` allows;
    the first fills its whole waves."""
    tile = _tile(m, n, sms, rank)
    one = ((m, *plan(m, n, k, sms, rank)),)
    n_tiles = -(-n // tile[1])
    whole = (-(-m // tile[0]) * n_tiles) // sms * sms // n_tiles * tile[0]  # rows that fill whole waves
    if not split or tile != TILE or not 0 < whole < m:
        return one
    tail = m - whole
    two = _waves(whole, n, tile, sms) + _waves(tail, n, _tile(tail, n, sms, rank), sms) + SPLIT_LAUNCH_K / k
    if two > (1 - SPLIT_MIN_GAIN) * _waves(m, n, tile, sms):
        return one
    return (whole, *plan(whole, n, k, sms, rank)), (tail, *plan(tail, n, k, sms, rank))


def _view(t: torch.Tensor | None, ffi: bool = False):
    if t is None:
        return None
    # dynamic shapes and leading stride: one compile serves every shape; TMA needs 16-byte aligned bases
    return _STATE["dsl"][3](t, assumed_align=16, enable_tvm_ffi=ffi).mark_layout_dynamic(leading_dim=t.dim() - 1)


def _stream(device: torch.device):
    return _STATE["dsl"][0].CUstream(torch.cuda.current_stream(device).cuda_stream)


def _compile(key, device: torch.device):
    """The variant compiled and loaded on ``device``, as a function of the torch tensors (a, w, a_scale, w_scale,
    y, lora_act, lora_up, bias) that launches on the current stream."""
    out, rank, bias, gelu, tile, raster_m, swizzle = key[:7]
    _, cutlass, cute, from_dlpack, kern = _STATE["dsl"]
    gemm = kern.Int8GemmSm90(tile, (1, 1), out, rank, swizzle=swizzle, bias=bias, gelu=gelu, raster_m=raster_m)
    dt = {name: dtype for dtype, name in DTYPES.items()}
    m, n, k = tile[0] * swizzle, tile[1] * swizzle, 128  # whole swizzle groups either way
    t = dict(a=torch.zeros(m, k, dtype=torch.int8, device=device), w=torch.zeros(n, k, dtype=torch.int8,
             device=device), s_a=torch.ones(m, device=device), s_w=torch.ones(n, device=device),
             y=torch.empty(m, n, dtype=dt[out], device=device),
             la=torch.zeros(m, rank, dtype=torch.bfloat16, device=device) if rank else None,
             lu=torch.zeros(n, rank, dtype=torch.bfloat16, device=device) if rank else None,
             b=torch.zeros(n, dtype=dt[bias], device=device) if bias else None)
    ffi = _STATE["ffi"]
    views = [_view(v, ffi) for v in t.values()]
    # one CTA per SM (the kernel's shared memory allows no second): the persistent grid
    sms = _sms(device)
    with warnings.catch_warnings():  # the DSL's notices about its own helpers (pinned below 4.9 for them)
        warnings.simplefilter("ignore", DeprecationWarning)
        if ffi:  # called with torch tensors on torch's current stream (TVM-FFI's environment stream)
            from cutlass.cute.runtime import make_fake_stream

            fn = cute.compile(gemm, *views, sms, make_fake_stream(use_tvm_ffi_env_stream=True),
                              options="--enable-tvm-ffi")
        else:
            compiled = cute.compile(gemm, *views, sms, _stream(device))

            def fn(*tensors):  # eight DLPack views and a stream object per call: ~0.15 ms of host time (H100)
                return compiled(*[_view(x) for x in tensors], _stream(device))
    fn(*t.values())  # loads the module now, outside any later CUDA graph capture
    return fn


def _sms(device: torch.device) -> int:
    key = ("sms", device.index)
    if key not in _STATE:  # asked once per GPU, on the first call (a device query is not free)
        _STATE[key] = torch.cuda.get_device_properties(device).multi_processor_count
    return _STATE[key]


def _compiled(out: str, rank: int, bias: str | None, gelu: bool, tile, raster_m: bool, swizzle: int,
              device: torch.device):
    """The compiled variant on ``device``, or None where the DSL is missing or the variant failed (said once)."""
    key = (out, rank, bias, gelu, tile, raster_m, swizzle, device.index)
    fn = _STATE.get(key)
    if fn is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the first call of a CUTLASS GEMM variant compiles it, which a CUDA graph capture "
                               "cannot hold: run the model once before capturing (svdquant.optimize does)")
        fn = False
        if available():
            try:
                with torch.cuda.device(device):
                    fn = _compile(key, device)
            except Exception as e:  # a driver or toolchain the DSL refuses: the Triton kernel still runs
                warnings.warn(f"the CUTLASS INT8 GEMM ({out}, rank {rank}, bias {bias}, GELU {gelu}, tile "
                              f"{tile[0]} x {tile[1]}, {'M' if raster_m else 'N'} first, swizzle {swizzle}) failed to "
                              f"compile on {device}, so these layers run Triton's GEMM: {type(e).__name__}: "
                              f"{str(e).strip()[:300]}", stacklevel=3)
        _STATE[key] = fn
    return fn or None


def int8_gemm_sm90(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   lora_act: torch.Tensor | None, lora_up: torch.Tensor | None, bias: torch.Tensor | None,
                   out_dtype: torch.dtype, gelu: bool = False) -> torch.Tensor | None:
    """``(a · wᵀ) · a_scale · w_scale (+ lora_act · lora_upᵀ) (+ bias)``, then tanh-GELU if ``gelu``, as
    :func:`svdquant.kernels.int8_gemm.int8_gemm` computes it: ``a`` [M, K] / ``w`` [N, K] int8, scales fp32,
    ``lora_act`` [M, R] / ``lora_up`` [N, R] bf16, ``bias`` [N] 16-bit, all contiguous (where :func:`takes`).
    None where this variant cannot run here (:func:`_compiled`): the caller runs another kernel."""
    m, n = a.shape[0], w.shape[0]
    rank = 0 if lora_up is None else lora_up.shape[1]
    parts = launches(m, n, a.shape[1], _sms(a.device), rank, SPLIT_TAIL)
    fns = [_compiled(DTYPES[out_dtype], rank, DTYPES[bias.dtype] if bias is not None else None, gelu, *part[1:],
                     a.device) for part in parts]
    if None in fns:
        return None
    y = torch.empty(m, n, dtype=out_dtype, device=a.device)
    a_scale, w_scale = pad_to(a_scale, TILE[0]), pad_to(w_scale, TILE[1])
    bias = None if bias is None else pad_to(bias, TILE[1])
    r0 = 0
    with torch.cuda.device(a.device):
        for fn, (rows, *_) in zip(fns, parts):  # row slices of whole tiles: 16-byte aligned views, no copies
            r1 = r0 + rows
            fn(a[r0:r1], w, a_scale[r0:], w_scale, y[r0:r1], None if lora_act is None else lora_act[r0:r1],
               lora_up, bias)
            r0 = r1
    return y
