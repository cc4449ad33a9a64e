"""FLUX's q/k RMSNorm + rotary embedding as one op (``svdquant.fuse(pipe, norm_rope=True)``): the reference is
diffusers' math to the bit; the Triton kernel against it (interpreter on the CPU, at small shapes; the GPU at FLUX's);
what the op cannot take; the processor on the tiny FLUX (exact on the CPU, fused and unfused, under torch.compile)."""

from __future__ import annotations

import copy
import itertools
import os

import tiny_models as tm  # first: sets HF_HUB_OFFLINE before diffusers is imported

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

import svdquant
from svdquant.ops import norm_rope as N

CUDA = torch.cuda.is_available()
interpreter = pytest.mark.skipif(CUDA or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter tests run on CPU machines")


def case(seed, b, s, s2, h, d, dtype, device="cpu"):
    """A strided q slice of a stacked q/k/v output, a text stream, two norm weights, FLUX-like rotary tables."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(b, s, 3 * h * d, generator=g).to(device=device, dtype=dtype)
    x2 = None if s2 is None else torch.randn(b, s2, h * d, generator=g).to(device=device, dtype=dtype)
    w, w2 = (torch.randn(d, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    angles = torch.randn(s + (s2 or 0), d // 2, generator=g).repeat_interleave(2, dim=1).to(device)
    return full[..., h * d:2 * h * d], w, angles.cos(), angles.sin(), x2, None if s2 is None else w2


def diffusers_way(x, w, cos, sin, eps, h, x2, w2):
    d = x.shape[-1] // h
    norms = []
    for weight in (w, w2):
        norm = torch.nn.RMSNorm(d, eps=eps).to(device=x.device, dtype=x.dtype)
        if weight is not None:
            norm.weight.data.copy_(weight)
        norms.append(norm)
    y = norms[0](x.unflatten(-1, (h, d)))
    if x2 is not None:
        y = torch.cat([norms[1](x2.unflatten(-1, (h, d))), y], dim=1)
    return apply_rotary_emb(y, (cos, sin), sequence_dim=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("s2", [None, 5])
def test_the_reference_is_diffusers_math_to_the_bit(dtype, s2):
    x, w, cos, sin, x2, w2 = case(0, 2, 11, s2, 3, 32, dtype)
    assert torch.equal(N.norm_rope_reference(x, w, cos, sin, 1e-6, 3, x2, w2),
                       diffusers_way(x, w, cos, sin, 1e-6, 3, x2, w2))


def truncated_reference(x, w, cos, sin, eps, h, x2, w2, round_norm=False):
    """The kernel's steps in torch, rounding fp32 to bf16 toward zero as Triton's interpreter does (the GPU rounds to
    nearest, as the reference does); ``round_norm``: the kernel's ROUND_NORM (Qwen-Image's norm rounding)."""
    def trunc(t):
        return (t.float().view(torch.int32) & -65536).view(torch.float32)

    def norm(t, weight):
        t = t.unflatten(-1, (h, -1)).float()
        normed = t * torch.rsqrt((t * t).sum(-1, keepdim=True) / t.shape[-1] + eps)
        return trunc((trunc(normed) if round_norm else normed) * weight.float())

    y = norm(x, w) if x2 is None else torch.cat([norm(x2, w2), norm(x, w)], 1)
    real, imag = y.reshape(*y.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], -1).flatten(3)
    return trunc(y * cos[None, :, None, :] + rotated * sin[None, :, None, :]).to(torch.bfloat16)


@interpreter
@pytest.mark.parametrize("s2", [None, 5])
@pytest.mark.parametrize("d, h, group, heads_first", [(16, 3, None, False), (64, 3, 3, True), (64, 3, 1, False),
                                                     (32, 6, 2, True)])
def test_kernel_against_the_reference_in_the_interpreter(s2, d, h, group, heads_first):
    """The same bits: fp16 as the reference, bf16 as the reference with the interpreter's rounding toward zero;
    a head a program (the default), 3 heads in one, 6 in three programs of 2; written contiguous or heads first;
    the rotation's partners split from registers (the default) or loaded again."""
    from svdquant.kernels.norm_rope import norm_rope_into

    for (dtype, reference), split in itertools.product(
            ((torch.float16, N.norm_rope_reference), (torch.bfloat16, truncated_reference)), (None, False)):
        x, w, cos, sin, x2, w2 = case(d + (s2 or 0), 2, 13, s2, h, d, dtype)
        ref = reference(x, w, cos, sin, 1e-6, h, x2, w2)
        out = torch.empty_like(ref.transpose(1, 2).contiguous()).transpose(1, 2) if heads_first else \
            torch.empty_like(ref)
        kw = dict(block_t=8) if group is None else dict(block_t=8, group=group)
        kw.update({} if split is None else dict(split=split))
        if x2 is not None:
            norm_rope_into(out, x2, w2, cos, sin, 1e-6, 0, **kw)
        norm_rope_into(out, x, w, cos, sin, 1e-6, 0 if s2 is None else s2, **kw)
        assert torch.equal(out, ref), (dtype, split)
        assert float((ref.float() - N.norm_rope_reference(x, w, cos, sin, 1e-6, h, x2, w2).float()).norm()) < \
            1e-2 * float(ref.float().norm())  # and the emulation is the reference but for rounding


@interpreter
@pytest.mark.parametrize("heads_first, group", [(False, 1), (True, 3)])
def test_the_pair_launch_writes_what_two_launches_write(heads_first, group):
    """pair=: the query and the key (slices of one stacked q/k/v output) in one launch, the same bits as one launch
    each, in both streams' places."""
    from svdquant.kernels.norm_rope import norm_rope_into

    g = torch.Generator().manual_seed(3)
    h, d, s, s2 = 3, 32, 11, 5
    full = torch.randn(2, s, 3 * h * d, generator=g).to(torch.bfloat16)
    text = torch.randn(2, s2, 3 * h * d, generator=g).to(torch.bfloat16)
    wq, wk, wq2, wk2 = (torch.randn(d, generator=g).to(torch.bfloat16) for _ in range(4))
    angles = torch.randn(s + s2, d // 2, generator=g).repeat_interleave(2, dim=1)
    cos, sin = angles.cos(), angles.sin()

    def empty():
        return torch.empty(2, h, s + s2, d, dtype=torch.bfloat16).transpose(1, 2) if heads_first else \
            torch.empty(2, s + s2, h, d, dtype=torch.bfloat16)
    q, k, q1, k1 = empty(), empty(), empty(), empty()
    for src, offset, w_q, w_k in ((text, 0, wq2, wk2), (full, s2, wq, wk)):
        xq, xk = src[..., :h * d], src[..., h * d:2 * h * d]
        norm_rope_into(q, xq, w_q, cos, sin, 1e-6, offset, block_t=8, group=group, pair=(k, xk, w_k))
        norm_rope_into(q1, xq, w_q, cos, sin, 1e-6, offset, block_t=8, group=group)
        norm_rope_into(k1, xk, w_k, cos, sin, 1e-6, offset, block_t=8, group=group)
    assert torch.equal(q, q1) and torch.equal(k, k1) and not torch.equal(q, k)


def test_a_pair_unlike_the_query_is_refused():
    from svdquant.kernels.norm_rope import norm_rope_into

    x, w, cos, sin, _, _ = case(0, 1, 4, None, 2, 16, torch.bfloat16)
    out = torch.empty(1, 4, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^pair= takes the key's output and input with the query's shapes, "
                                         r"strides and dtypes$"):
        norm_rope_into(out, x, w, cos, sin, 1e-6, 0, pair=(out, x.contiguous(), w))


def test_a_group_that_does_not_divide_the_heads_is_refused():
    from svdquant.kernels.norm_rope import norm_rope_into

    x, w, cos, sin, _, _ = case(0, 1, 4, None, 6, 16, torch.bfloat16)
    out = torch.empty(1, 4, 6, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^group=4 heads a program must divide the 6 heads$"):
        norm_rope_into(out, x, w, cos, sin, 1e-6, 0, group=4)


@pytest.mark.parametrize("change, reason", [
    (lambda a: {**a, "x": a["x"].unflatten(-1, (3, -1))}, "not [batch, tokens, heads · head_dim]"),
    (lambda a: {**a, "x": a["x"].transpose(1, 2).contiguous().transpose(1, 2)}, "with a unit stride"),
    (lambda a: {**a, "heads": 4}, "head size 24 (it takes"),
    (lambda a: {**a, "heads": 1}, "head size 96 (it takes a power of two from 16 to 256)"),
    (lambda a: {**a, "cos": a["cos"][:-1]},
     "rotary tables of shapes (15, 32), (16, 32) (it takes [16, 32] or [1, 16, 32])"),
    (lambda a: {**a, "weight": a["weight"][:8]}, "norm weights that are not one value per head channel"),
    (lambda a: {**a, "x2": a["x2"].float()}, "streams of shapes"),
    (lambda a: {**a, "x": a["x"].float(), "x2": a["x2"].float()}, "torch.float32 (it takes float16 or bfloat16)"),
    (lambda a: {**a, "sin": a["sin"].to("meta")}, "tensors on more than one device"),
])
def test_what_the_op_cannot_take(change, reason):
    x, w, cos, sin, x2, w2 = case(1, 1, 11, 5, 3, 32, torch.bfloat16)
    args = dict(x=x, weight=w, cos=cos, sin=sin, heads=3, x2=x2, weight2=w2)
    assert N.unsupported(**args) is None
    assert reason in N.unsupported(**change(args))


@pytest.mark.parametrize("heads_first, strides", [(False, (1536, 96, 32, 1)), (True, (1536, 32, 512, 1))])
def test_fake_gives_the_output_shape_and_layout(heads_first, strides):
    """The fake's shape and strides are the op's own (heads first: the transpose of a contiguous [B, H, S, D]), and
    the values are the reference's either way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, cos, sin, x2, w2 = case(2, 2, 11, 5, 3, 32, torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = N.norm_rope(x, w, cos, sin, 1e-6, 3, x2, w2, heads_first=heads_first)
    out = N.norm_rope(x, w, cos, sin, 1e-6, 3, x2, w2, heads_first=heads_first)
    assert fake.shape == out.shape == (2, 16, 3, 32) and fake.dtype == out.dtype == torch.bfloat16
    assert fake.stride() == out.stride() == strides
    assert torch.equal(out, N.norm_rope_reference(x, w, cos, sin, 1e-6, 3, x2, w2))


@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("s2", [None, 5])
def test_the_qk_op_is_the_op_for_each(heads_first, s2):
    """norm_rope_qk: q and k as norm_rope gives each (the same bits, shapes and strides), and its fake agrees."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, wq, cos, sin, q2, wq2 = case(4, 2, 11, s2, 3, 32, torch.bfloat16)
    k, wk, _, _, k2, wk2 = case(5, 2, 11, s2, 3, 32, torch.bfloat16)
    args = (q, k, wq, wk, cos, sin, 1e-6, 3, q2, k2, wq2, wk2)
    out_q, out_k = N.norm_rope_qk(*args, heads_first=heads_first)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_q, fake_k = N.norm_rope_qk(*args, heads_first=heads_first)
    for out, fake, x, w, x2, w2 in ((out_q, fake_q, q, wq, q2, wq2), (out_k, fake_k, k, wk, k2, wk2)):
        one = N.norm_rope(x, w, cos, sin, 1e-6, 3, x2, w2, heads_first=heads_first)
        assert torch.equal(out, one) and out.stride() == one.stride() == fake.stride()
        assert fake.shape == out.shape and fake.dtype == out.dtype
    assert not torch.equal(out_q, out_k)


@interpreter
@pytest.mark.parametrize("pairable", [True, False])
@pytest.mark.parametrize("s2", [None, 5])
def test_the_qk_launches_write_what_a_launch_each_writes(pairable, s2, monkeypatch):
    """The qk op's GPU path, run by the interpreter: a stream's q and k in one launch where they share strides (slices
    of one stacked output), else a launch each (here the image stream's k copied out of the stack); the text stream
    first, the image stream after it; the same bits as a launch each."""
    from svdquant.kernels import norm_rope as K

    g = torch.Generator().manual_seed(6)
    h, d, s = 3, 32, 11
    full = torch.randn(2, s, 3 * h * d, generator=g).to(torch.bfloat16)
    text = torch.randn(2, s2 or 1, 3 * h * d, generator=g).to(torch.bfloat16)
    wq, wk, wq2, wk2 = (torch.randn(d, generator=g).to(torch.bfloat16) for _ in range(4))
    angles = torch.randn(s + (s2 or 0), d // 2, generator=g).repeat_interleave(2, dim=1)
    cos, sin = angles.cos(), angles.sin()
    xq, xk = full[..., :h * d], full[..., h * d:2 * h * d]
    xk = xk if pairable else xk.contiguous()
    tq, tk = (text[..., :h * d], text[..., h * d:2 * h * d]) if s2 else (None, None)
    q, k, q1, k1 = (torch.empty(2, s + (s2 or 0), h, d, dtype=torch.bfloat16) for _ in range(4))
    launches = []
    monkeypatch.setattr(N.library, "_kernels", lambda: type("kernels", (), {"norm_rope_into": staticmethod(
        lambda *a, **kw: launches.append("pair" in kw) or K.norm_rope_into(*a, **kw))}))
    N._streams_into(q, xq, wq, tq, wq2, cos, sin, 1e-6, False, key=(k, xk, None, tk, wk2))
    assert launches == [True] * (2 if s2 else 1) if pairable else launches == [True] * bool(s2) + [False, False]
    ones = torch.ones(d, dtype=torch.bfloat16)
    for out, x, w, t, tw in ((q1, xq, wq, tq, wq2), (k1, xk, ones, tk, wk2)):
        if s2:
            K.norm_rope_into(out, t, tw, cos, sin, 1e-6, 0)
        K.norm_rope_into(out, x, w, cos, sin, 1e-6, s2 or 0)
    assert torch.equal(q, q1) and torch.equal(k, k1) and not torch.equal(q, k)


@pytest.mark.parametrize("change, reason", [
    (lambda a: {**a, "k": a["k"][:1], "k2": a["k2"][:1]},
     "a query and a key of shapes (2, 11, 96) and (1, 11, 96) (text (2, 5, 96) and (1, 5, 96)), dtypes"),
    (lambda a: {**a, "k": torch.cat([a["k2"][:, :1], a["k"]], 1), "k2": a["k2"][:, 1:]},
     "a query and a key of shapes (2, 11, 96) and (2, 12, 96) (text (2, 5, 96) and (2, 4, 96))"),
    (lambda a: {**a, "k": torch.cat([a["k2"], a["k"]], 1), "k2": None, "weight_k2": None},
     "(2, 11, 96) and (2, 16, 96) (text (2, 5, 96) and None)"),
    (lambda a: {**a, "k": a["k"].half(), "k2": a["k2"].half()}, "dtypes torch.bfloat16 and torch.float16"),
    (lambda a: {**a, "weight_k": a["weight_k"][:8]}, "norm weights that are not one value per head channel"),
    (lambda a: {**a, "k2": a["k2"][:, :-1]}, "rotary tables of shapes"),
])
def test_what_the_qk_op_cannot_take(change, reason):
    """Each tensor as the op takes it (unsupported's reasons), then a query and a key that agree in each stream: the
    op writes both at the same token offsets, one layout."""
    q, wq, cos, sin, q2, wq2 = case(4, 2, 11, 5, 3, 32, torch.bfloat16)
    k, wk, _, _, k2, wk2 = case(5, 2, 11, 5, 3, 32, torch.bfloat16)
    args = dict(q=q, k=k, weight_q=wq, weight_k=wk, cos=cos, sin=sin, heads=3, q2=q2, k2=k2, weight_q2=wq2,
                weight_k2=wk2)
    assert N.unsupported_qk(**args) is None
    assert reason in N.unsupported_qk(**change(args))


def test_which_attention_backends_read_heads_first():
    """diffusers' SDPA backends, flex and Blackwell's sage hub kernel transpose q/k/v to [B, H, S, D]; flash, the
    other sage ones and svdquant's do not; a processor's None is the process's active backend (native unless set)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from svdquant.integrations.diffusers.compat import attention_reads_heads_first as reads

    assert [reads(b) for b in ("native", "_native_cudnn", "flex", "sage_blackwell_hub", "flash", "_flash_3", "sage",
                               "svdquant_flash4", AttentionBackendName._NATIVE_MATH, AttentionBackendName.FLASH)] == \
        [True, True, True, True, False, False, False, False, True, False]
    assert reads(None)  # this process's default: native


@pytest.fixture(scope="module")
def quantized_flux():
    return tm.quantized_flux()


def bf16(model, inputs):
    return copy.deepcopy(model).to(torch.bfloat16), {
        k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in
        ("img_ids", "txt_ids") else v for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_tiny_flux_with_it_is_bit_for_bit_the_same_on_the_cpu(quantized_flux, dtype, monkeypatch):
    """Its double and single blocks, before and after svdquant.fuse stacks the projections (the single blocks' q/k/v
    + MLP still stack under it): the op's CPU path is the reference. In bf16 every attention calls the op once, for
    q and k; fp32 goes to the reference in the processor."""
    from svdquant._state import peek
    from svdquant.modules import norm_rope as M

    model, inputs = bf16(*quantized_flux) if dtype == torch.bfloat16 else (copy.deepcopy(quantized_flux[0]),
                                                                           quantized_flux[1])
    calls = []
    heads_first = []
    monkeypatch.setattr(M, "norm_rope_qk", lambda *a, **k: calls.append(a[0].shape) or
                        heads_first.append(k["heads_first"]) or N.norm_rope_qk(*a, **k))
    attentions = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert len(model.transformer_blocks) and len(model.single_transformer_blocks)
    with torch.no_grad():
        plain = model(**inputs)[0]
        assert M.fuse_norm_rope(model) == attentions
        assert torch.equal(model(**inputs)[0], plain)
        assert len(calls) == (attentions if dtype == torch.bfloat16 else 0)
        assert all(first for first in heads_first)  # diffusers' default backend, native SDPA, reads heads first
        assert svdquant.fuse(model)["qkv"] == attentions
        assert all(peek(b).stack is not None for b in model.single_transformer_blocks)
        assert torch.equal(model(**inputs)[0], plain)
        assert svdquant.unfuse(model)["norm_rope"] == attentions
        assert torch.equal(model(**inputs)[0], plain)


def test_it_compiles_as_one_op_and_keeps_the_backend(quantized_flux):
    """Traced whole in bf16 (the op's fake): no graph break, the op in the graph; ``set_attention_backend`` reaches
    diffusers' processor under it, which unfuse gives back."""
    from svdquant.integrations.diffusers.compat import set_attention_backend_locally

    model, inputs = bf16(*quantized_flux)
    svdquant.fuse(model, norm_rope=True)
    set_attention_backend_locally(model, "_native_math")  # diffusers' own call would make it every model's default
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        eager = model(**inputs)[0]
        assert torch.equal(compiled(**inputs)[0], eager)
    ops = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.svdquant.norm_rope_qk.default]
    assert len(ops) == len(model.transformer_blocks) + len(model.single_transformer_blocks)
    svdquant.unfuse(model)
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert processors and all(p._attention_backend == "_native_math" for p in processors)


def test_norms_with_hooks_or_their_own_eps_keep_diffusers_processor(quantized_flux):
    """The op reads the norms' weights and takes one eps: a norm with a hook or a forward of its own would be
    skipped, and a text norm with an eps unlike the image's would be given the image's, so those attentions keep
    diffusers' processor."""
    from svdquant.modules.norm_rope import fuse_norm_rope

    attentions = len(quantized_flux[0].transformer_blocks) + len(quantized_flux[0].single_transformer_blocks)
    model = copy.deepcopy(quantized_flux[0])
    model.transformer_blocks[0].attn.norm_k.register_forward_hook(lambda *a: None)
    model.single_transformer_blocks[0].attn.norm_q.forward = lambda x: x
    assert fuse_norm_rope(model) == attentions - 2
    model = copy.deepcopy(quantized_flux[0])
    model.transformer_blocks[0].attn.norm_added_q.eps = 1e-5
    assert fuse_norm_rope(model) == attentions - 1


def test_fuse_flags_are_checked():
    with pytest.raises(ValueError, match=r"^norm_rope='yes': use True or False$"):
        svdquant.fuse(tm.build_flux(), norm_rope="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("s2", [None, 512])
def test_gpu_kernel_at_the_flux_shape(s2):
    """One FLUX.1 image's q (4,096 image tokens, 24 heads of 128, a slice of the stacked q/k/v output) against the
    reference on the GPU: at most one bf16 step apart (the reference's fp32 sum runs in another order); written heads
    first, compiled, and in a CUDA graph the same bits."""
    x, w, cos, sin, x2, w2 = case(3, 1, 4096, s2, 24, 128, torch.bfloat16, device="cuda")
    ref = N.norm_rope_reference(x, w, cos, sin, 1e-6, 24, x2, w2)
    out = N.norm_rope(x, w, cos, sin, 1e-6, 24, x2, w2)
    first = N.norm_rope(x, w, cos, sin, 1e-6, 24, x2, w2, heads_first=True)
    assert torch.equal(first, out) and first.stride() == (24 * out.shape[1] * 128, 128, out.shape[1] * 128, 1)
    compiled_first = torch.compile(lambda *a: N.norm_rope(*a, heads_first=True), fullgraph=True)
    assert torch.equal(compiled_first(x, w, cos, sin, 1e-6, 24, x2, w2), out)
    err = (out.float() - ref.float()).abs()
    assert float((err > 0).float().mean()) < 1e-3 and float(err.max()) <= 2 ** -7 * float(ref.float().abs().max())
    compiled = torch.compile(lambda *a: N.norm_rope(*a), fullgraph=True)
    assert torch.equal(compiled(x, w, cos, sin, 1e-6, 24, x2, w2), out)
    pair = N.norm_rope_qk(x, x, w, w, cos, sin, 1e-6, 24, x2, x2, w2, w2, heads_first=True)  # one launch a stream
    assert all(torch.equal(t, first) and t.stride() == first.stride() for t in pair)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = N.norm_rope(x, w, cos, sin, 1e-6, 24, x2, w2)
        captured_first = N.norm_rope(x, w, cos, sin, 1e-6, 24, x2, w2, heads_first=True)
    graph.replay()
    assert torch.equal(captured, out) and torch.equal(captured_first, out)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_pair_launch_at_the_flux_shape():
    """A single block's q and k (4,608 tokens, 24 heads of 128, slices of one stacked output) in one launch: the
    same bits as a launch each, heads first."""
    from svdquant.kernels.norm_rope import norm_rope_into

    g = torch.Generator().manual_seed(5)
    full = torch.randn(1, 4608, 3 * 3072, generator=g).to("cuda", torch.bfloat16)
    wq, wk = (torch.randn(128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    angles = torch.randn(4608, 64, generator=g).repeat_interleave(2, dim=1).cuda()
    cos, sin = angles.cos(), angles.sin()
    q, k, q1, k1 = (torch.empty(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                    for _ in range(4))
    xq, xk = full[..., :3072], full[..., 3072:6144]
    norm_rope_into(q, xq, wq, cos, sin, 1e-6, 0, pair=(k, xk, wk))
    norm_rope_into(q1, xq, wq, cos, sin, 1e-6, 0)
    norm_rope_into(k1, xk, wk, cos, sin, 1e-6, 0)
    assert torch.equal(q, q1) and torch.equal(k, k1)
    q2, k2 = torch.empty_like(q), torch.empty_like(k)
    norm_rope_into(q2, xq, wq, cos, sin, 1e-6, 0, pair=(k2, xk, wk), split=False)
    assert torch.equal(q2, q) and torch.equal(k2, k)  # the partners loaded again: the same bits
    assert torch.equal(k, N.norm_rope(xk, wk, cos, sin, 1e-6, 24, heads_first=True))
    qk = torch.compile(lambda *a: N.norm_rope_qk(*a, heads_first=True), fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(qk(xq, xk, wq, wk, cos, sin, 1e-6, 24), (q, k)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = qk(xq, xk, wq, wk, cos, sin, 1e-6, 24)
    graph.replay()
    assert torch.equal(captured[0], q) and torch.equal(captured[1], k)  # the op, compiled, in a CUDA graph


@interpreter
def test_the_benchmark_quick_times_every_variant(tmp_path):
    """benchmarks/norm_rope_speed.py --quick: both cases, diffusers' math, the kernel at each config (in the
    interpreter, within its bf16 truncation of the reference) and for q and k with the partners loaded; the ops'
    rows run their CPU path, the reference."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import norm_rope_speed

    norm_rope_speed.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "norm_rope_speed.json").read_text())
    for case in ("single", "double"):
        rows = res["cases"][case]["variants"]
        kernels = {norm_rope_speed.kernel_label(b, min(g, 2), split) for b, g, split in norm_rope_speed.CONFIGS}
        pairs = {"svdquant op, q then k (two launches a stream)", "svdquant qk op, q and k in one launch a stream",
                 "svdquant kernel, q and k in one launch a stream, partners loaded"}
        assert set(rows) == {"diffusers eager", "svdquant op, written heads first (SDPA's layout)", *kernels, *pairs}
        assert len(kernels) == 6  # every config its own (4 heads a program are 2 of the tiny case's 2)
        # within two bf16 steps of values up to 32 (k's outputs reach 16-32 here: a step is 0.125)
        assert all(0 < r["ms"] and r["max_abs_err"] <= 0.25 for r in rows.values())
        assert {label: r["bytes"] // res["cases"][case]["bytes"] for label, r in rows.items()} \
            == {label: 2 if label in pairs else 1 for label in rows}  # the pairs timed on q's and k's bytes
