"""Per-layer SVDQuant: smoothing search, low-rank branch with refinement, residual quantization.

A quantized linear computes

    Y ≈ Q((X + s) / λ) · Q(R)ᵀ + (X · L1ᵀ) · L2ᵀ + b'

with ``Ŵ = W·diag(λ)``, ``Ŵ ≈ L2·L1' + R``, ``L1 = L1'/λ`` folded offline so the
branch reads the raw input, ``s`` the post-GELU shift (0 elsewhere) and
``b' = b − s·Σ_k Q(R)_nk / λ_k`` its compensation. Everything is chosen to minimize the
squared error of the *output* on calibration inputs, with both quantizers simulated
(:func:`simulate`), so what is scored is what the module computes.

Layers that read the same input (q/k/v) are quantized together by
:func:`quantize_linears`: one λ for all, scored on their summed error, and either one
shared branch (SVD of the stacked weights) or one branch each.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .._timing import StageClock
from .._memory import device_room
from ..formats import QTensor, check_finite, fake_quantize, get_format, quantize
from ..formats.int4 import shift_vector
from ..recipes import POST_GELU_SHIFT, QuantConfig
from .gptq import gptq_members, hessian
from .lowrank import low_rank
from .search import search
from .gpu_kernels import scoring_product, weight_rounding_kernel


@dataclass
class QuantizedWeights:
    """What a quantized linear stores; :class:`svdquant.SVDQLinear` is built from it."""

    weight: QTensor                    # Q(R), codes unpacked
    bias: torch.Tensor | None          # b', model dtype
    smooth: torch.Tensor | None        # λ (fp32), None for weight-only recipes
    lora_down: torch.Tensor | None     # L1 = L1'/λ, [rank, K], model dtype
    lora_up: torch.Tensor | None       # L2, [N, rank], model dtype
    act_shift: float = 0.0
    act_unsigned_from: int = 0  # the shift and unsigned range apply to channels >= this
    input_scale: torch.Tensor | None = None  # NVFP4 activations: static fp32 tensor scale


@dataclass
class LayerReport:
    """How one linear was quantized: what was chosen and what it costs in output error."""

    shape: tuple[int, int]
    method: str
    rank: int
    alpha: float = 0.0
    beta: float = 0.0
    iterations: int = 0
    rel_error_naive: float = float("nan")   # round-to-nearest with the same formats
    rel_error: float = float("nan")         # ‖Ŷ − Y‖ / ‖Y‖ on the scoring tokens
    rel_error_rtn: float = float("nan")     # the same with the residual rounded to nearest (differs with GPTQ)
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # error of each refinement iterate
    # wall seconds of "setup" (inputs, reference output, naive error), "smoothing search" (a branch and a
    # residual per candidate λ), "refinement" (the SVD iterations), "gptq" and "assemble" (the final rounding)
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def sqnr_db(self) -> float:
        return -20 * math.log10(max(self.rel_error, 1e-12))


class _Problem:
    """The fixed data of one (group of) linear(s): weights, inputs, reference output."""

    def __init__(self, weights, inputs, recipe: QuantConfig, post_gelu: bool):
        self.recipe = recipe
        self.dtype = weights[0].dtype if weights[0].is_floating_point() else torch.float32
        self.splits = [w.shape[0] for w in weights]
        self.w = torch.cat([w.detach().float() for w in weights], 0)
        k = self.w.shape[1]
        x = _flatten_inputs(inputs, k).to(self.w.device)
        check_finite(x, "calibration inputs")
        quantized_act = recipe.activations is not None
        self.act_format = get_format(recipe.activations) if quantized_act else None
        # Post-GELU inputs are shifted and quantized unsigned only where the activation format has
        # unsigned groups (4-bit); a per-token INT8 range loses little to GELU's asymmetry.
        shifted = post_gelu is not False and post_gelu is not None and quantized_act and self.act_format.unsigned_groups
        self.shift = POST_GELU_SHIFT if shifted else 0.0
        self.unsigned_from = (0 if post_gelu is True else int(post_gelu)) if shifted else None
        self.unsigned = (True if self.unsigned_from == 0 else self.unsigned_from) if shifted else False
        self.shift_vec = shift_vector(k, self.shift, self.unsigned_from, x.device)
        self.act_max = (x + self.shift_vec).abs().amax(0).clamp_min(1e-5) if quantized_act else None
        self.w_max = self.w.abs().amax(0).clamp_min(1e-5)
        t = x.shape[0]
        n_eval = min(recipe.eval_tokens, t) if recipe.eval_tokens > 0 else t
        if recipe.gptq:  # GPTQ must be judged on tokens it did not fit: at most half of them score
            n_eval = max(1, min(n_eval, t // 2))
        idx = torch.linspace(0, t - 1, n_eval, device=x.device).round().long()
        self.x = x[idx].contiguous()
        # GPTQ's Hessian of the raw inputs (the smoothing rescales it later) over the tokens that do not score, so
        # keeping GPTQ or rounding to nearest is decided on held-out tokens: with few tokens (fewer than K) GPTQ
        # fits them and does worse on others. As a difference: no copy of the other tokens.
        self.xtx = hessian(x).sub_(hessian(self.x)) if recipe.gptq and t > 1 else None
        self.y = self.x @ self.w.T
        self.y_energy = max(float(self.y.square().sum()), 1e-30)
        self.round_kernel = weight_rounding_kernel(recipe, self.w.device)
        self.scoring = scoring_product(self.w.device)

    # -- the quantizers, as the module applies them ---------------------------------
    def fq_act(self, inv_smooth: torch.Tensor | None) -> torch.Tensor:
        r = self.recipe
        if r.activations is None:
            return self.x.to(self.dtype).float()
        u = (self.x + self.shift_vec) * inv_smooth[..., None, :]  # a batch of candidates: [B, T, K]
        ts = self.input_scale(inv_smooth) if self.act_format.static_input_scale else None
        return fake_quantize(u, r.activations, r.act_group_size, unsigned=self.unsigned,
                             scale_dtype=self.dtype, tensor_scale=ts, check=False)

    def input_scale(self, inv_smooth: torch.Tensor) -> torch.Tensor:
        """NVFP4 activations: static per-tensor scale from the calibration maximum."""
        return ((self.act_max * inv_smooth).amax() / (6.0 * 448.0)).clamp_min(1e-12)

    def fq_weight(self, r_all: torch.Tensor) -> torch.Tensor:
        rc = self.recipe
        if self.round_kernel is not None:  # row by row (a batch of candidates too), bit-identical to fq below
            return self.round_kernel(r_all.reshape(-1, r_all.shape[-1])).view(r_all.shape)

        def fq(t):
            return fake_quantize(t, rc.weights, rc.group_size, scale_dtype=self.dtype, weight=True, check=False)

        if len(self.splits) == 1:
            return fq(r_all)
        # Per member: NVFP4's tensor scale belongs to each weight, not to the group.
        return torch.cat([fq(t) for t in r_all.split(self.splits, -2)], -2)

    def branch(self, a: torch.Tensor, shared: bool, bases=None):
        """Low-rank fit of ``a`` [N_total, K]: stacked ``up`` [N_total, r], one ``down`` per member,
        and the SVD bases that warm-start the next fit."""
        rc = self.recipe
        if shared or len(self.splits) == 1:
            f = low_rank(a, rc.branch_rank, rc.svd, bases[0] if bases else None)
            return f.up, [f.down] * len(self.splits), [f.basis]
        fits = [low_rank(p, rc.branch_rank, rc.svd, bases[i] if bases else None)
                for i, p in enumerate(a.split(self.splits, -2))]
        return torch.cat([f.up for f in fits], -2), [f.down for f in fits], [f.basis for f in fits]

    def product(self, up: torch.Tensor, downs: list[torch.Tensor]) -> torch.Tensor:
        if all(d is downs[0] for d in downs):
            return up @ downs[0]
        return torch.cat([u @ d for u, d in zip(up.split(self.splits, -2), downs)], -2)

    def error(self, xq, wq, inv_smooth, up, downs) -> float:
        """Squared output error of the quantized layer on the scoring tokens."""
        return float(self.errors(xq, wq, inv_smooth, up, downs))

    def errors(self, xq, wq, inv_smooth, up, downs) -> torch.Tensor:
        """:meth:`error` as a tensor, one per candidate for a batch (leading dimension of every argument)."""
        y = self.scoring(xq, wq)
        inv = inv_smooth[..., None, :] if inv_smooth is not None else None  # [.., 1, K]
        if inv is not None and self.shift:
            y -= (wq * (inv * self.shift_vec)).sum(-1)[..., None, :]
        if up.shape[-1]:
            ups = up.split(self.splits, -2)
            cache: dict[int, torch.Tensor] = {}
            cols = []
            for u, d in zip(ups, downs):
                if id(d) not in cache:  # a shared branch's down projection is computed once
                    cache[id(d)] = self.x @ (d * inv if inv is not None else d).mT
                cols.append(cache[id(d)] @ u.mT)
            y += torch.cat(cols, -1)
        return (y - self.y).square().sum((-2, -1))


def _candidate(res, j: int):
    """Candidate ``j`` of a batched fit, copied out of the batch (so the batch can be freed); a branch shared by
    the members stays one tensor."""
    errs, up, downs, resid, wq = res

    def take(t):  # no branch: the empty factors are shared by the batch
        return t[j].clone() if t.ndim == resid.ndim else t

    own = {id(d): take(d) for d in downs}
    return float(errs[j]), take(up), [own[id(d)] for d in downs], resid[j].clone(), wq[j].clone()


def _candidates_per_batch(p: "_Problem", concurrent: int = 1) -> int:
    """How many smoothing candidates one batched fit scores: on a GPU, as many as a quarter of the memory torch
    may still allocate holds (the next block's replay runs alongside), at most 8; with ``concurrent`` groups
    quantized at once, each takes ``1 / (2 · (concurrent + 1))`` of it (the same quarter for one); one at a time on the CPU
    (no launch cost to amortize) and for formats with a per-tensor scale (NVFP4: a batch is not row-wise)."""
    rc = p.recipe
    if p.w.device.type != "cuda" or get_format(rc.weights).static_input_scale or (
            p.act_format is not None and p.act_format.static_input_scale):
        return 1
    n, k = p.w.shape
    t = p.x.shape[0]
    per = 4 * (5 * n * k + 3 * t * n + 2 * t * k)  # w·λ, branch product, residual, rounded, error terms
    room = device_room(p.w.device)
    return max(1, min(8, int(room // (2 * (concurrent + 1)) // per)))


def peak_bytes(rows: int, k: int, recipe: QuantConfig) -> int:
    """What quantizing one group of ``rows`` output rows over ``k`` inputs holds on the device at its peak, besides
    its candidate batches (sized to what is free: :func:`_candidates_per_batch`): the weights in fp32, the residual
    and its rounding (3 N K), and with GPTQ the inputs' XᵀX and, at the inverse factor's peak, about three more
    K × K matrices and the rows' working copies (:mod:`svdquant.algorithm.gptq`). 4 bytes each. A FLUX.1-dev
    single block's out projection (3,072 × 15,360): 4.9 GB; a double block's fc2 (3,072 × 12,288): 3.3 GB."""
    n = 3 * rows * k
    if recipe.gptq:
        n += 4 * k * k + 3 * rows * k
    return 4 * n


def _flatten_inputs(inputs, k: int) -> torch.Tensor:
    parts = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    for t in parts:
        if not torch.is_tensor(t) or t.ndim < 1 or t.shape[-1] != k:
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"calibration inputs must be tensors [..., {k}] (the layer's in_features), got {shape}")
    x = torch.cat([t.reshape(-1, k).float() for t in parts], 0)
    if x.shape[0] == 0:
        raise ValueError("calibration inputs are empty; pass at least one token")
    return x


def candidate_smoothing(act_max, w_max, grid) -> list[tuple[float, float, torch.Tensor]]:
    """``λ_j = max|X_j|^α / max|W_j|^β`` for every (α, β), normalized to geometric mean 1."""
    out = []
    for alpha, beta in grid:
        lam = act_max.pow(alpha) / w_max.pow(beta)
        lam = lam / lam.log().mean().exp()
        out.append((alpha, beta, lam.clamp(1e-6, 1e6)))
    return out


def quantize_linears(
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    inputs,
    recipe: QuantConfig,
    *,
    post_gelu: bool | int = False,
    shared_branch: bool = True,
    act_max: torch.Tensor | None = None,
    concurrent: int = 1,
) -> tuple[list[QuantizedWeights], LayerReport]:
    """Quantize linears that read the same input with one smoothing factor.

    ``weights`` are ``[N_i, K]`` tensors (any float dtype: the model dtype, which the
    scales, branch and bias are stored in), ``inputs`` a tensor ``[..., K]`` (or a list of
    them) of calibration inputs, ``post_gelu`` marks inputs that follow a GELU (INT4
    activations then use the unsigned shifted format): ``True`` for all channels or the
    index of the first GELU channel (a multiple of the group). ``act_max`` optionally
    gives ``max|X_j|`` over more tokens than ``inputs`` holds; ``concurrent`` says how many groups are
    quantized at once on this device (each batch of smoothing candidates takes its share of the free memory).
    Returns one
    :class:`QuantizedWeights` per weight and one report for the group.
    """
    t0 = time.perf_counter()
    # wall time per stage (each ends in a float() of an error, a host sync on a GPU), and a profiler range each
    clock = StageClock()
    stages = clock.seconds
    with clock.stage("setup"):
        k = _check_weights(weights)
        p = _Problem(weights, inputs, recipe, post_gelu)
        if act_max is not None and p.act_max is not None:
            p.act_max = torch.maximum(p.act_max, (act_max.to(p.w.device).float() + p.shift_vec).abs().clamp_min(1e-5))
        rc = recipe
        report = LayerReport(shape=(sum(p.splits), k), method=rc.method, rank=rc.branch_rank, stages=stages)
        no_branch = (p.w.new_zeros(p.w.shape[0], 0), [p.w.new_zeros(0, k)] * len(p.splits))
        ones = torch.ones(k, device=p.w.device) if rc.activations is not None else None
        report.rel_error_naive = math.sqrt(p.error(p.fq_act(ones), p.fq_weight(p.w), ones, *no_branch) / p.y_energy)

    with clock.stage("smoothing search"):
        fit = _fitter(p, shared_branch, no_branch)
        if rc.smooths:
            lam, best = _search_smoothing(p, fit, report, concurrent)
        else:
            lam = ones
            res = fit(lam)
            best = (float(res[0]), *res[1:])
        report.history.append(best[0])

    with clock.stage("refinement"):
        if rc.method == "svdquant" and rc.iterations > 0:
            best = _refine(p, lam, best, shared_branch, report)
        err, up, downs, resid, wq = best
        report.rel_error = report.rel_error_rtn = math.sqrt(err / p.y_energy)
    rounded = None
    if p.xtx is not None:
        with clock.stage("gptq"):
            rounded, g_err = _gptq_residual(p, lam, up, downs, resid)
            if g_err < err:  # on the scoring tokens, which GPTQ did not see; else round to nearest stays
                report.rel_error = math.sqrt(g_err / p.y_energy)
            else:
                rounded = None
    with clock.stage("assemble"):
        out = _assemble(p, lam, up, downs, resid, biases, rounded)
    report.seconds = time.perf_counter() - t0
    return out, report


def _check_weights(weights: list[torch.Tensor]) -> int:
    """The group's common input width K, after checking every weight is a finite ``[N_i, K]`` matrix."""
    if not weights:
        raise ValueError("quantize_linears needs at least one weight")
    k = weights[0].shape[1]
    for w in weights:
        if w.ndim != 2 or w.shape[1] != k:
            raise ValueError(f"weights must all be [N, {k}] matrices, got {tuple(w.shape)}")
        check_finite(w, "the weight")
    return k


def _fitter(p: _Problem, shared_branch: bool, no_branch):
    """``fit(lam)``: branch and residual for one λ ``[K]``, or a batch of them ``[B, K]`` (no refinement):
    (squared error(s) as a tensor, up, downs, residual, rounded residual)."""
    rc = p.recipe

    def fit(lam):
        inv = 1.0 / lam if lam is not None else None
        w_hat = p.w * lam[..., None, :] if lam is not None else p.w
        if rc.lowrank == "svd":
            up, downs, _ = p.branch(w_hat, shared_branch)
            resid = w_hat - p.product(up, downs)
        elif rc.lowrank == "lorc":
            up, downs, _ = p.branch(w_hat - p.fq_weight(w_hat), shared_branch)
            resid = w_hat
        else:
            up, downs = no_branch
            resid = w_hat
        wq = p.fq_weight(resid)
        return p.errors(p.fq_act(inv), wq, inv, up, downs), up, downs, resid, wq

    return fit


def _search_smoothing(p: _Problem, fit, report: LayerReport, concurrent: int = 1):
    """The smoothing search over the recipe's grid: ``(λ, (error, up, downs, residual, rounded residual))`` of the
    best candidate; its (α, β) go into ``report``."""
    rc = p.recipe
    cands = candidate_smoothing(p.act_max, p.w_max, rc.smooth_grid)
    size = _candidates_per_batch(p, concurrent)
    kept = None  # the best so far: (error, grid index, up, downs, residual, rounded residual)

    def score(indices):
        nonlocal kept
        errs = []
        for start in range(0, len(indices), size):
            chunk = indices[start:start + size]
            batched = len(chunk) > 1  # one launch per step for the chunk: the search is bound by the host's launches
            res = fit(torch.stack([cands[i][2] for i in chunk]) if batched else cands[chunk[0]][2])
            e = res[0].reshape(-1).tolist()
            j = min(range(len(chunk)), key=lambda j: (e[j], chunk[j]))  # ties: the earlier candidate
            if kept is None or (e[j], chunk[j]) < kept[:2]:
                c = _candidate(res, j) if batched else (e[0], *res[1:])
                kept = (c[0], chunk[j], *c[1:])
            errs += e
            res = None
        return errs

    search([a for a, _, _ in cands], score, rc.smooth_search)
    err, i, *rest = kept
    report.alpha, report.beta = cands[i][0], cands[i][1]
    return cands[i][2], (err, *rest)


def _refine(p: _Problem, lam, best, shared_branch: bool, report: LayerReport):
    """L_k = SVD_r(Ŵ − Q(Ŵ − L_{k−1})): refit the branch to what the quantized residual misses, while the error
    falls. Returns the best ``(error, up, downs, residual, rounded residual)``."""
    err, up, downs, resid, wq = best
    inv = 1.0 / lam if lam is not None else None
    w_hat = p.w * lam if lam is not None else p.w
    xq = p.fq_act(inv)
    bases = None
    for _ in range(p.recipe.iterations):
        cur_up, cur_downs, bases = p.branch(w_hat - wq, shared_branch, bases)
        cur_resid = w_hat - p.product(cur_up, cur_downs)
        cur_wq = p.fq_weight(cur_resid)
        cur_err = p.error(xq, cur_wq, inv, cur_up, cur_downs)
        report.history.append(cur_err)
        if cur_err >= err:
            break
        err, up, downs, resid, wq = cur_err, cur_up, cur_downs, cur_resid, cur_wq
        report.iterations += 1
    return err, up, downs, resid, wq


def _round(p: _Problem, r_i: torch.Tensor) -> QTensor:
    """One member's residual rounded to nearest, the weight rule (the stored form of ``fq_weight``)."""
    return quantize(r_i, p.recipe.weights, p.recipe.group_size, scale_dtype=p.dtype, weight=True, check=False)


def _gptq_residual(p: _Problem, lam, up, downs, resid) -> tuple[list[QTensor], float]:
    """Each member's residual rounded by GPTQ under its round-to-nearest scales, with the Hessian of what the
    residual multiplies (the inputs divided by λ), and the squared output error it gives on the scoring tokens."""
    inv = 1.0 / lam if lam is not None else None
    rs = resid.split(p.splits, 0)
    qs = gptq_members(list(rs), p.xtx, [_round(p, r_i) for r_i in rs], damp=p.recipe.gptq_damp, scale=inv)
    wq = torch.cat([q.dequantize() for q in qs], 0)
    return qs, p.error(p.fq_act(inv), wq, inv, up, downs)


def _assemble(p: _Problem, lam, up, downs, resid, biases, rounded=None) -> list[QuantizedWeights]:
    dt = p.dtype
    inv = 1.0 / lam if lam is not None else None
    input_scale = p.input_scale(inv) if p.act_format is not None and p.act_format.static_input_scale else None
    out = []
    for i, (r_i, up_i) in enumerate(zip(resid.split(p.splits, 0), up.split(p.splits, 0))):
        q = rounded[i] if rounded is not None else _round(p, r_i)
        b = biases[i].detach().float() if biases[i] is not None else None
        if p.shift:
            comp = (q.dequantize() * (inv * p.shift_vec)).sum(1)
            b = -comp if b is None else b - comp
        has_branch = up_i.shape[1] > 0
        down_i = downs[i] * inv if (has_branch and inv is not None) else downs[i]
        out.append(QuantizedWeights(
            weight=q,
            bias=b.to(dt) if b is not None else None,
            smooth=lam.float().clone() if lam is not None else None,
            lora_down=down_i.to(dt).contiguous() if has_branch else None,
            lora_up=up_i.to(dt).contiguous() if has_branch else None,
            act_shift=p.shift,
            act_unsigned_from=p.unsigned_from or 0,
            input_scale=input_scale,
        ))
    return out


def quantize_linear(weight, bias, inputs, recipe: QuantConfig, *, post_gelu: bool | int = False):
    """One linear: :func:`quantize_linears` with a group of one."""
    (qw,), report = quantize_linears([weight], [bias], inputs, recipe, post_gelu=post_gelu)
    return qw, report
