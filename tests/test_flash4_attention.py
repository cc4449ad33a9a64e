"""flash-attn-4 as svdquant's attention backend (issue 23): what the op takes, its fake for torch.compile, the diffusers
backend (the native one for what it cannot take, and on the CPU), ``optimize(attention="flash4")``'s checks; on a GPU
with flash-attn-4 installed, the op against SDPA at FLUX's shape, compiled and in a CUDA graph."""

from __future__ import annotations

import sys

import pytest
import torch

from svdquant.ops import flash4_attention as flash4

CUDA = torch.cuda.is_available()
FLASH4 = flash4.available() if CUDA else False


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def bshd(seed, b, s, h, d, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype)


def sdpa(q, k, v, **kw):
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            **kw).transpose(1, 2)


@pytest.mark.parametrize("change, message", [
    (dict(attn_mask=torch.ones(1, 10, dtype=torch.bool)), "a mask, dropout, causal or grouped-query attention"),
    (dict(dropout_p=0.1), "a mask, dropout, causal or grouped-query attention"),
    (dict(is_causal=True), "a mask, dropout, causal or grouped-query attention"),
    (dict(enable_gqa=True), "a mask, dropout, causal or grouped-query attention"),
    (dict(bhs=True), "tensors of 3, 3, 3 dims (it takes [batch, tokens, heads, head_dim])"),
    (dict(dtype=torch.float32), "torch.float32 / torch.float32 / torch.float32 (it takes float16 or bfloat16)"),
    (dict(v_dtype=torch.float16), "torch.bfloat16 / torch.bfloat16 / torch.float16 (it takes float16 or bfloat16)"),
    (dict(d=76), "head size 76 (it takes a multiple of 8 up to 128, or 256, the same for q, k, v)"),
    (dict(d=160), "head size 160 (it takes a multiple of 8 up to 128, or 256, the same for q, k, v)"),
    (dict(d=264), "head size 264 (it takes a multiple of 8 up to 128, or 256, the same for q, k, v)"),
    (dict(v_d=32), "head size 64 (it takes a multiple of 8 up to 128, or 256, the same for q, k, v)"),
    (dict(k_tokens=12), "q, k, v of shapes (1, 10, 2, 64), (1, 12, 2, 64), (1, 10, 2, 64)"),
    (dict(k_heads=1), "q, k, v of shapes (1, 10, 2, 64), (1, 10, 1, 64), (1, 10, 2, 64)"),
    (dict(k_tokens=0, v_tokens=0), "empty q or k (shapes (1, 10, 2, 64), (1, 0, 2, 64))"),
    (dict(strided=True), "q, k or v without a unit stride in the head dimension"),
    ({}, "tensors on cpu (it runs on a CUDA GPU)"),
])
def test_what_the_op_cannot_take(change, message):
    d, dtype = change.pop("d", 64), change.pop("dtype", torch.bfloat16)
    q = torch.randn(1, 10, 2, d, dtype=dtype)
    k = torch.randn(1, change.pop("k_tokens", 10), change.pop("k_heads", 2), d, dtype=dtype)
    v = torch.randn(1, change.pop("v_tokens", 10), 2, change.pop("v_d", d), dtype=change.pop("v_dtype", dtype))
    if change.pop("bhs", False):
        q, k, v = q[0], k[0], v[0]
    if change.pop("strided", False):
        q = torch.randn(1, 10, 2, 2 * d, dtype=dtype)[..., ::2]
    assert flash4.unsupported(q, k, v, **change) == message


def test_the_op_has_a_fake_for_the_compiler(monkeypatch):
    """What torch.compile traces the op with: GPU-shaped fake tensors (no GPU needed), the output in q's shape with
    v's head size; the checks pass for FLUX's shape on a device found usable, and name the fix on one not checked."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4608, 24, 128, device="cuda", dtype=torch.bfloat16)
        assert flash4.unsupported(q, q, q) == (
            "cuda:0: flash-attn-4 not checked or not usable there (sm_90 / sm_100 with flash-attn-4 installed; "
            "svdquant.optimize or register_flash4() checks)")
        monkeypatch.setitem(flash4.USABLE, 0, True)
        assert flash4.unsupported(q, q, q) is None
        out = flash4.attention(q, q, q)
        assert out.shape == (2, 4608, 24, 128) and out.dtype == torch.bfloat16 and out.device.type == "cuda"


def test_where_it_is_available(monkeypatch):
    """Installed and importable, on sm_90 and sm_100 only; what it says when it is not installed or fails to import
    (FlashAttention-2's package failing to load its extension counts as not installed)."""
    monkeypatch.setattr(flash4.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flash4.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(flash4, "USABLE", {})
    monkeypatch.setattr(flash4, "import_error", lambda: None)
    for major, usable in ((8, False), (9, True), (10, True), (12, False)):
        monkeypatch.setattr(flash4.torch.cuda, "get_device_capability", lambda index=None, m=major: (m, 0))
        assert flash4.available("cuda:0") is usable and flash4.USABLE == {0: usable}
    assert not flash4.available("cpu")
    monkeypatch.setattr(flash4, "import_error", lambda: "flash-attn-4 is not installed")
    assert not flash4.available() and flash4.USABLE == {0: False}


def test_what_it_says_when_it_does_not_import(monkeypatch):
    monkeypatch.setattr(flash4, "_FUNC", [])
    monkeypatch.setattr(flash4.importlib.util, "find_spec", lambda name: None)
    assert not flash4.installed()
    assert flash4.import_error() == "flash-attn-4 is not installed (pip install flash-attn-4==4.0.0b36, on Linux)"
    for error in (ModuleNotFoundError("No module named 'flash_attn'"), OSError("libcudart.so.12: cannot open")):
        def failing(name, error=error):  # no flash_attn, or FlashAttention-2's package failing to load its extension
            raise error

        monkeypatch.setattr(flash4.importlib.util, "find_spec", failing)
        assert not flash4.installed()
    monkeypatch.setattr(flash4.importlib.util, "find_spec", lambda name: object())  # found, but fails to import
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    assert flash4.import_error() == (
        "flash-attn-4 fails to import (ModuleNotFoundError: import of flash_attn.cute halted; None in sys.modules; "
        "pip install flash-attn-4==4.0.0b36, on Linux)")
    with pytest.raises(RuntimeError, match=r"^svdquant_flash4 needs flash-attn-4: flash-attn-4 fails to import"):
        flash4.flash4_attention(*(torch.zeros(1, 2, 1, 8),) * 3, 1.0)


def test_the_backend_runs_sdpa_for_what_it_cannot_take():
    """On the CPU (and for a mask, dropout ...) the backend is diffusers' native one: the same output, exactly."""
    from svdquant.integrations.diffusers.attention import svdquant_flash4_attention

    q, k, v = (bshd(i, 1, 12, 2, 64, torch.float32) for i in range(3))
    assert torch.equal(svdquant_flash4_attention(q, k, v), sdpa(q, k, v))
    mask = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[..., 0] = True
    assert torch.allclose(svdquant_flash4_attention(q, k, v, attn_mask=mask), sdpa(q, k, v, attn_mask=mask),
                          atol=1e-6)


def test_the_backend_is_a_diffusers_name_and_a_model_runs_through_it():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from svdquant.integrations.diffusers import attention as backend
    from svdquant.integrations.diffusers.compat import set_attention_backend_locally
    from test_int8_attention import tiny_flux

    m, inputs = tiny_flux()
    with torch.no_grad():
        native = m(**inputs).sample
    active = _AttentionBackendRegistry._active_backend
    assert backend.register_flash4() == backend.register_flash4() == "svdquant_flash4"
    set_attention_backend_locally(m, "svdquant_flash4")
    assert _AttentionBackendRegistry._active_backend == active
    assert {p._attention_backend.value for p in m.attn_processors.values()} == {"svdquant_flash4"}
    with torch.no_grad():
        assert torch.equal(m(**inputs).sample, native)  # the CPU: the native backend, exactly


def test_optimize_says_why_flash4_cannot_run(monkeypatch):
    """``optimize(attention="flash4")``'s attention step (called directly: on the CPU optimize stops before it): an
    fp32 model, not installed, another GPU, a head size it does not take, legacy processors: left as it was, with
    the reason; otherwise set, and the captured graphs retired."""
    from diffusers import PixArtTransformer2DModel

    from svdquant.modules import revision
    from svdquant.pipelines import optimize as opt
    from svdquant.pipelines.optimize import Optimized, _set_attention, check_attention
    from test_int8_attention import tiny_flux

    check_attention("flash4")
    with pytest.raises(ValueError, match=r"^attention='flash': use 'auto', None, 'int8', 'flash4' or one of"):
        check_attention("flash")

    def why(model):
        report = Optimized(device="cpu")
        _set_attention(model, "flash4", report)
        assert report.attention is None
        return report.skipped["attention"]

    m, _ = tiny_flux()
    assert why(m) == "flash4: a torch.float32 model (the kernel takes 16-bit); attention left as it was"
    m = m.to(torch.bfloat16)
    assert why(m) == "flash4: a model on the cpu (flash-attn-4 runs on a CUDA GPU); attention left as it was"
    probed = []
    monkeypatch.setattr(opt, "_device_of", lambda model: torch.device("cuda", 0))  # as if on a GPU
    monkeypatch.setattr(flash4, "available", lambda device=None: probed.append(device) or True)
    monkeypatch.setattr(flash4, "import_error", lambda: 1 / 0)  # must not be imported on another GPU
    monkeypatch.setattr(opt.torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert why(m) == ("flash4: an sm_86 GPU (flash-attn-4's kernels run on sm_90 and sm_100 here); attention left "
                      "as it was")
    monkeypatch.setattr(opt.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(flash4, "import_error", lambda: "flash-attn-4 is not installed (pip install ...)")
    assert why(m) == "flash4: flash-attn-4 is not installed (pip install ...); attention left as it was"
    monkeypatch.setattr(flash4, "import_error", lambda: None)
    monkeypatch.setattr(opt, "_attention_shape", lambda model: (2, 160, 4096))
    assert why(m) == "flash4: head size 160 (it takes a multiple of 8 up to 128, or 256); attention left as it was"
    assert probed == [torch.device("cuda", 0)]  # recorded usable on the model's device before the head size
    monkeypatch.undo()
    monkeypatch.setattr(opt, "_device_of", lambda model: torch.device("cuda", 0))
    monkeypatch.setattr(opt.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(flash4, "import_error", lambda: None)
    monkeypatch.setattr(flash4, "available", lambda device=None: True)
    pixart = PixArtTransformer2DModel(sample_size=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                      in_channels=4, out_channels=4, cross_attention_dim=16, caption_channels=8,
                                      norm_type="ada_norm_single").to(torch.bfloat16)
    assert why(pixart) == ("flash4: the model's attention processors are diffusers' legacy ones, which call "
                           "PyTorch's SDPA themselves; attention left as it was")
    before = revision()
    report = Optimized(device="cpu")
    _set_attention(m, "flash4", report)
    assert report.attention == "svdquant_flash4" and "attention" not in report.skipped and revision() > before
    assert {p._attention_backend.value for p in m.attn_processors.values()} == {"svdquant_flash4"}


def test_auto_takes_flash4_where_it_times_fastest(monkeypatch):
    """``attention="auto"``: flash-attn-4 timed beside SDPA where it can run, in CUDA graphs where the step runs in
    them (both in the choice's key); the fastest set through svdquant's backend. On the CPU the backend then runs
    the native one: the same output."""
    from svdquant.pipelines import optimize as opt
    from svdquant.pipelines.optimize import Optimized, _set_attention
    from test_int8_attention import tiny_flux

    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    m, inputs = tiny_flux()
    m = m.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
              for k, v in inputs.items()}
    with torch.no_grad():
        native = m(**inputs).sample
    timed = []

    def fake_time(heads, dim, tokens, dtype, device, flash4_runs, graphs):
        timed.append((flash4_runs, graphs))
        return ("svdquant_flash4" if flash4_runs else "_native_cudnn"), {"_native_cudnn": 0.45, "svdquant_flash4": 0.42}

    monkeypatch.setattr(opt, "_time_attention", fake_time)
    monkeypatch.setattr(opt.torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(opt, "_attention_choice", {})
    monkeypatch.setattr(opt, "_why_not_flash4", lambda model: None)
    report = Optimized(device="cpu")
    _set_attention(m, "auto", report)
    assert report.attention == "svdquant_flash4" and timed == [(True, True)]
    assert report.attention_ms == {"_native_cudnn": 0.45, "svdquant_flash4": 0.42}
    with torch.no_grad():
        assert torch.equal(m(**inputs).sample, native)
    _set_attention(m, "auto", Optimized(device="cpu"), graphs=False)  # timed again: eagerly, a key of its own
    monkeypatch.setattr(opt, "_why_not_flash4", lambda model: "not here")
    report = Optimized(device="cpu")
    _set_attention(m, "auto", report)
    assert timed == [(True, True), (True, False), (False, True)] and report.attention == "_native_cudnn"
    assert _AttentionBackendRegistry._active_backend == active  # set on this model only, not every model's default


@pytest.mark.gpu
@pytest.mark.skipif(not FLASH4, reason="needs flash-attn-4 and an sm_90 / sm_100 GPU")
def test_gpu_flash4_at_the_flux_shape():
    """One FLUX.1 image's attention (4,608 tokens, 24 heads of 128) in bf16 against SDPA: exact attention both, so
    within bf16's rounding of the output; compiled whole and replayed from a CUDA graph, the same bits."""
    q, k, v = (bshd(i, 1, 4608, 24, 128, device="cuda") for i in range(3))
    out = flash4.attention(q, k, v)
    assert rel(out, sdpa(q.float(), k.float(), v.float())) < 1e-2
    compiled = torch.compile(lambda a, b, c: flash4.attention(a, b, c), fullgraph=True)
    assert torch.equal(compiled(q, k, v), out)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = flash4.attention(q, k, v)
    q.copy_(bshd(7, 1, 4608, 24, 128, device="cuda"))
    graph.replay()
    assert torch.equal(captured, flash4.attention(q, k, v))


@pytest.mark.gpu
@pytest.mark.skipif(not FLASH4, reason="needs flash-attn-4 and an sm_90 / sm_100 GPU")
def test_gpu_optimize_times_flash4_beside_sdpa():
    """``optimize(attention="auto")`` on the tiny quantized FLUX times flash-attn-4 with the SDPA backends (in CUDA
    graphs); ``attention="flash4"`` sets it: compiled and graph-captured, flash-attn-4 called by every attention, close
    to the model with SDPA. (Exact attention at the tiny shape can round to SDPA's very bits, so the calls are
    counted: a silent fallback to SDPA fails the count, not the comparison.)"""
    import tiny_models as tm
    from diffusers.models.attention import AttentionModuleMixin

    from svdquant.pipelines.optimize import deoptimize, optimize
    from test_int8_attention import optimized_against_sdpa

    model, inputs = tm.on_cuda(*tm.quantized_flux())
    report = optimize(model, layers=False)
    assert {"_native_cudnn", "svdquant_flash4"} <= set(report.attention_ms)
    deoptimize(model)
    real, calls = flash4._FUNC[0], []
    flash4._FUNC[0] = lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw)
    try:
        first, second, sdpa = optimized_against_sdpa("flash4", "svdquant_flash4", model, inputs)
    finally:
        flash4._FUNC[0] = real
    layers = sum(isinstance(m, AttentionModuleMixin) for m in model.modules())
    assert len(calls) >= layers > 0  # run eagerly in the capture's warm-up (replays run no Python)
    assert torch.equal(first, second) and rel(first, sdpa) < 2e-2
