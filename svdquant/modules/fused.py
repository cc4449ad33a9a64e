"""Run-time fusions of a quantized model: q/k/v as one GEMM, and an MLP's GELU moved into its down projection.

**q/k/v.** The layers of a shared-input group run as one quantized linear: FLUX.1's and FLUX.2's attentions (both
streams), Wan's self-attention, SD3's joint attention, and through :mod:`.fused_view` Qwen-Image's (both streams),
Z-Image's and the self-attention of PixArt-Σ, SANA and SDXL's UNet.

The quantizer gives the layers that read the same input (an attention's q/k/v) one smoothing λ and one
shared low-rank down projection (:mod:`svdquant.models.architectures`), so their quantized activations
and ``X·L1ᵀ`` are the same tensor. Run apart, the step makes that tensor three times and launches three
narrow GEMMs; stacked, one activation pass feeds one GEMM three times as wide (the published engine runs
FLUX's q/k/v the same way: one ``qkv_proj``). A FLUX single block's MLP up projection reads the same normed input
with the same λ (one quantization group), so there q/k/v and ``proj_mlp`` stack into one GEMM 7 × 3072 wide:
:func:`fuse_projections` then runs the block through ``compat.stacked_single_block_forward`` (diffusers' steps, one
projection; the attention receives the projections through :class:`Projected`).

:class:`FusedSVDQLinear` is what diffusers' fused-projection convention calls: a FLUX attention with
``fused_projections = True`` computes ``to_qkv(x).chunk(3, -1)`` (and ``to_added_qkv`` for the text
stream); an SD3 joint attention gets :class:`FusedJointAttnProcessor`, which reads them the same way. The
member layers stay the modules of record: the state dict, checkpoints and LoRAs address
them, and they can still run alone. On the GPU's speed mode the fused runner holds the stacked INT8
weight and the members hold row views of it, so nothing is resident twice; in memory mode it expands the members'
own 4-bit codes (their buffers) into one INT8 operand per call (memory mode ran its members in turn before: on an
H200 its FLUX.1-dev step was 15.7 % slower than fused speed mode). Where offload hooks sit on the members (leaf-level
group offloading), a memory-mode stack runs its members in turn, so that the hooks bring their buffers in. Elsewhere
(the CPU reference) the fused module concatenates its members' outputs, which is exactly the unfused result.

**GELU.** FLUX's and Wan's MLPs compute ``fc2(GELU_tanh(fc1(x)))`` (diffusers' ``GELU`` module of a
``FeedForward``; a FLUX single block's ``proj_out(cat([attention, act_mlp(proj_mlp(x))]))``). Unfused, the GELU
is a pass of its own: the 16-bit pre-activation goes to memory, back, and out again. :func:`fuse_gelu` moves it
into fc2 (:meth:`SVDQLinear.set_input_gelu`): the INT8 activation pass that reads fc2's input anyway applies the
GELU to each block as it loads it, in both of its passes (:mod:`svdquant.kernels.activations`); fc1 writes its
plain output. In a FLUX single block ``proj_out``'s input channels after the attention's (3,072) are the MLP's,
so its GELU starts there; the stacked q/k/v + ``proj_mlp`` GEMM writes the MLP's pre-activation, and ``proj_out``
reads the attention output and that column slice of the stack's output as two parts (``SVDQLinear.forward``'s
``tail``): diffusers' GELU and ``torch.cat``, a pass over the whole 15,360-wide input, are not made at all.
Where fc2 does not quantize its activations, the GELU goes into fc1's GEMM epilogue instead
(:meth:`SVDQLinear.set_output_gelu`, ``fuse_gelu(into="up")``): on the fp32 result before it is rounded to 16
bits. Both placements measured on an H200 (BENCHMARKS.md, "The MLP's GELU"): a FLUX.1-dev step took 110.95 ms
with the GELU in the down projections' passes against 111.91 in the up projections' epilogues (batch 1; 104.19
against 105.08 per image at batch 4), once the GELU was one ``tanh.approx`` instruction; with ``exp`` and a
division it spilled the epilogue's registers and bound the passes on the special-function unit. The module tree keeps its names (``net.0.proj`` stays the
projection), so checkpoints and LoRAs are unchanged.

:func:`fuse` applies both; :func:`unfuse` undoes them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._state import peek, state, take
from ..formats import get_format
from ..integrations.diffusers import compat  # diffusers' internals go through compat
from .fused_view import PROJECTIONS, view_processor, viewable
from .linear import SVDQLinear, bump_revision


class FusedSVDQLinear(nn.Module):
    """Layers that read one input, stacked by output rows (see the module doc)."""

    def __init__(self, members: list[SVDQLinear]):
        super().__init__()
        if len(members) < 2 or not all(isinstance(m, SVDQLinear) for m in members):
            raise TypeError("FusedSVDQLinear stacks two or more SVDQLinear layers")
        first = members[0]
        for m in members[1:]:
            if m.in_features != first.in_features or m.config() | {"out_features": 0} != \
                    first.config() | {"out_features": 0}:
                raise ValueError("fused layers must share their input width and quantization layout")
        self.__dict__["members"] = tuple(members)  # not submodules: the state dict stays the members'
        self.in_features = first.in_features
        self.out_features = sum(m.out_features for m in members)
        for m in members:
            m.set_stacked_in(self)
        self._branch_blocked = False  # apart because a member took a branch the stacked runner cannot take
        self.refresh()

    def refresh(self) -> None:
        """Rebuild after a member was (re)prepared: loading, ``.to``, a weight-mode change."""
        for m in self.members:  # a LoRA added since a member last ran is not in its runner yet
            m._apply_stale_branch()
        runners = [m._runner for m in self.members]
        outs = [m.out_features for m in self.members]
        self._runner = None
        self._reads_members = False
        bump_revision()
        kind = type(runners[0])
        gelu = any(m.output_gelu or m.input_gelu_from is not None for m in self.members)
        if not kind.stacks or any(type(r) is not kind for r in runners) or gelu or \
                len({m.wscales.device for m in self.members}) > 1:  # a model moved layer by layer between GPUs
            return  # the CPU reference, another path, or a member's own GELU: the members run in turn
        try:  # the INT8 kernels (speed mode: members then hold row views), or svdquant.optimize's one 16-bit GEMM
            self._runner = kind.stack(runners, outs)
        except ValueError:  # layers that do not share their input's smoothing, or in two weight modes
            return
        self._branch_blocked = False
        for m in self.members:  # a W4A16 stack's members: their codes are rows of the stack's now
            m.drop_owned_packed()
        self._reads_members = getattr(self._runner, "parts", None) is not None  # memory mode: their buffers
        self.sync_compiled_activations()

    def sync_compiled_activations(self) -> None:
        """One activation pass for all members: in the compiled graph only when every member asks for it."""
        if self._runner is not None and self._runner.quantizes_in_graph:
            self._runner.act_in_graph = all(m.compiled_activations for m in self.members)

    def refresh_branch(self) -> bool:
        """A member's LoRAs changed (its runner rebuilt its branch): restack the branches (in place where the
        shapes stay; True if the stacked runner now holds other tensors)."""
        if self._runner is None:  # one runner again once the branch that kept the members apart is gone
            if self._branch_blocked and all(getattr(m._runner, "down", None) is None for m in self.members):
                self.refresh()
            return self._runner is not None
        # dense: the members rewrote their rows of the stacked weight in place, nothing to restack
        try:
            return self._runner.restack_branch([m._runner for m in self.members])
        except ValueError:  # a branch the stack cannot take (weight-only layers): its members in turn
            self.refresh()
            self._branch_blocked = True
            return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a memory-mode stack reads its members' buffers, which offload hooks on the members (leaf-level group
        # offloading, accelerate's cpu_offload) bring in only when the members' own forwards run
        if self._runner is None or (self._reads_members and any(compat.has_hooks(m) for m in self.members)):
            return torch.cat([m(x) for m in self.members], dim=-1)
        y = self._runner(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        path = "one stacked runner" if self._runner is not None else "members in turn"
        return f"in_features={self.in_features}, out_features={self.out_features}, members={len(self.members)}, {path}"


class FusedJointAttnProcessor:
    """SD3's joint attention reading the stacked projections: diffusers' ``JointAttnProcessor2_0`` (the same
    steps: per-stream q/k/v, SD3.5's q/k RMS norms, one attention over the image then text tokens, the
    output projections) with ``to_qkv`` / ``to_added_qkv`` for the three projections of each stream.

    diffusers' own ``FusedJointAttnProcessor2_0`` cannot be used: it skips the q/k norms of SD3.5."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n_image = hidden_states.shape[0], hidden_states.shape[1]

        def heads(t):
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        def project(x, fused, names, norm_q, norm_k):
            if isinstance(fused, FusedSVDQLinear):
                q, k, v = (heads(t) for t in fused(x).chunk(3, dim=-1))
            else:
                q, k, v = (heads(getattr(attn, a)(x)) for a in names)
            return (norm_q(q) if norm_q is not None else q), (norm_k(k) if norm_k is not None else k), v

        q, k, v = project(hidden_states, getattr(attn, "to_qkv", None), PROJECTIONS[0][1], attn.norm_q, attn.norm_k)
        if encoder_hidden_states is not None:
            cq, ck, cv = project(encoder_hidden_states, getattr(attn, "to_added_qkv", None), PROJECTIONS[1][1],
                                 attn.norm_added_q, attn.norm_added_k)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, encoder_hidden_states) if encoder_hidden_states is not None else out


class Projected(nn.Module):
    """A single block's ``to_qkv`` when the block already projected q/k/v (stacked with its MLP's up projection):
    the attention is handed the projections and diffusers' processor reads them through here."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv


def _stackable_single_block(block) -> list[SVDQLinear] | None:
    """q, k, v, proj_mlp of an unfused FLUX single block that read their input with one λ, or None."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxSingleTransformerBlock

    if type(block) is not FluxSingleTransformerBlock or "forward" in block.__dict__:
        return None
    attn = block.attn
    # its GELU in place, or moved into proj_out by fuse_gelu; not one moved into proj_mlp's epilogue (one GEMM
    # for the stack cannot apply one member's GELU: it would run its members in turn, slower than unstacked);
    # diffusers' processor, or svdquant's q/k norm + RoPE processor around it (fuse(norm_rope=True), .norm_rope)
    if attn.fused_projections or type(getattr(attn.processor, "original", attn.processor)) is not FluxAttnProcessor or \
            getattr(block.proj_mlp, "output_gelu", False) or \
            not (isinstance(block.act_mlp, nn.GELU) or peek(block).act_mlp is not None):
        return None
    members = [getattr(attn, a, None) for a in PROJECTIONS[0][1]] + [block.proj_mlp]
    if not all(isinstance(m, SVDQLinear) and m.activations is not None for m in members) or \
            not (members[0].smooth_inv.is_meta or  # not loaded yet: stacked anyway, exact either way
                 all(torch.equal(m.smooth_inv, members[0].smooth_inv) for m in members[1:])):
        return None
    return members


def _stack_single_block(block, members) -> bool:
    try:
        stacked = FusedSVDQLinear(members)
    except ValueError:
        return False
    state(block).stack = stacked
    block.attn.to_qkv = Projected()
    block.attn.fused_projections = True
    # diffusers' (un)fuse_qkv_projections must leave this attention alone: its to_qkv is not a projection
    compat.set_qkv_fusion_supported(block.attn, False)  # h-diffusers
    block.forward = compat.stacked_single_block_forward.__get__(block)  # h-diffusers
    return True


def _unstack_single_block(block) -> bool:
    stacked = take(block, "stack")
    if stacked is None:
        return False
    del block.forward
    block.attn._modules.pop("to_qkv", None)
    compat.set_qkv_fusion_supported(block.attn, True)  # h-diffusers
    block.attn.fused_projections = False
    _release(stacked)
    return True


def _fusable(attn) -> str | None:
    """"flux" (diffusers reads ``to_qkv`` when ``fused_projections``: FLUX.1's and FLUX.2's attentions, Wan's
    self-attention), "joint" (SD3: the processor is swapped for :class:`FusedJointAttnProcessor`), "view" (diffusers'
    processor wrapped: :mod:`.fused_view`), or None."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttention
    from diffusers.models.transformers.transformer_flux2 import Flux2Attention
    from diffusers.models.transformers.transformer_wan import WanAttention

    # Wan's cross-attention with fused projections reads ``to_kv`` (the text's k/v, weight-only here) instead:
    # only its self-attention reads ``to_qkv``
    if isinstance(attn, (FluxAttention, Flux2Attention)) or (isinstance(attn, WanAttention) and
                                                             not attn.is_cross_attention):
        return None if attn.fused_projections else "flux"
    if isinstance(attn, Attention) and type(attn.processor) is JointAttnProcessor2_0:
        return "joint"
    if viewable(attn):
        return "view"
    return None


def fuse_projections(model: nn.Module, *, single_mlp: bool = True) -> int:
    """Stack the quantized q/k/v of every attention that allows it (FLUX.1/.2 and Wan self-attention through
    diffusers' fused projections, SD3's joint attention through our processor, the others through
    :mod:`.fused_view`): one activation pass and one GEMM per stream instead of three; in a FLUX single block also its
    MLP's up projection (``single_mlp``). Returns how many attentions were fused. Exact: the outputs equal the
    unfused ones. :func:`unfuse_projections` undoes it."""
    n = 0
    for block in list(model.modules()) if single_mlp else []:
        members = _stackable_single_block(block)
        if members is not None and _stack_single_block(block, members):
            n += 1
    for attn in model.modules():
        kind = _fusable(attn)
        if kind is None:
            continue
        made = {}
        for fused_name, names in PROJECTIONS:
            members = [getattr(attn, a, None) for a in names]
            if all(isinstance(m, SVDQLinear) for m in members):
                try:
                    made[fused_name] = FusedSVDQLinear(members)
                except ValueError:  # a stream that cannot stack (e.g. different layouts): leave the attention as is
                    for f in made.values():
                        _release(f)
                    made.clear()
                    break
        if "to_qkv" in made and (kind != "flux" or len(made) == len(PROJECTIONS) or
                                 getattr(attn, "add_q_proj", None) is None):
            # FLUX's processor fuses both streams or none; ours take each stream as it is
            for fused_name, f in made.items():
                setattr(attn, fused_name, f)
            if kind != "flux":
                state(attn).processor = attn.processor
                # not set_processor: it would drop nothing, but logs
                attn.processor = FusedJointAttnProcessor() if kind == "joint" else view_processor(attn.processor)
            else:
                attn.fused_projections = True
            n += 1
        else:
            for f in made.values():
                _release(f)
    return n


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: every member layer holds its own weights again."""
    blocks = [b for b in model.modules() if peek(b).stack is not None]
    stacked_forward = compat.stacked_single_block_forward  # h-diffusers
    for block in blocks:  # before changing anything
        if getattr(block.__dict__.get("forward"), "__func__", None) is not stacked_forward:
            raise RuntimeError(f"a hook wraps the forward of a fused {type(block).__name__} (a cache or offload "
                               "hook added after svdquant.fuse); remove it before unfusing")
    n = sum(_unstack_single_block(block) for block in blocks)
    for attn in model.modules():
        fused = [(name, getattr(attn, name, None)) for name, _ in PROJECTIONS]
        fused = [(name, f) for name, f in fused if isinstance(f, FusedSVDQLinear)]
        if not fused:
            continue
        for name, f in fused:
            delattr(attn, name)
            _release(f)
        processor = take(attn, "processor")
        if processor is not None:
            attn.processor = processor
        else:
            attn.fused_projections = False
        n += 1
    return n


class ProjectedGELU(nn.Module):
    """diffusers' ``GELU(dim, inner, approximate="tanh")`` whose tanh-GELU another step applies: the down projection
    reading its output, in its activation pass (``down``: the MLP's last layer), or else its own projection, in the
    GEMM's epilogue."""

    def __init__(self, original: nn.Module, down: nn.Module | None):
        super().__init__()
        self.proj = original.proj  # the same module: state-dict names stay "net.0.proj.*"
        self.__dict__["original"] = original  # what unfuse puts back (not a submodule)
        self.__dict__["down"] = down
        if down is not None:
            down.set_input_gelu(0)
        else:
            self.proj.set_output_gelu(True)

    def restore(self) -> nn.Module:
        if self.down is not None:
            self.down.set_input_gelu(None)
        else:
            self.proj.set_output_gelu(False)
        return self.original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


GELU_INTO = ("down", "up")


def _takes_input_gelu(m) -> bool:
    """A layer whose GPU runner applies an input GELU as its activation pass reads X: integer activations (the INT8
    path; elsewhere, the CPU included, the layer applies it before its runner, the same numbers)."""
    return isinstance(m, SVDQLinear) and m.activations is not None and get_format(m.activations).integer


def fuse_gelu(model: nn.Module, *, into: str = "down") -> int:
    """Move every quantized MLP's tanh-GELU out of its own pass (see the module doc); returns how many. ``into="down"``:
    into the down projection's activation pass where that layer quantizes its activations (else into the up
    projection's epilogue); ``"up"``: into the up projection's epilogue."""
    from diffusers.models.activations import GELU

    if into not in GELU_INTO:
        raise ValueError(f"into={into!r}: use one of {GELU_INTO}")
    n = 0
    for mod in list(model.modules()):
        net = getattr(mod, "net", None)
        if isinstance(net, nn.ModuleList) and len(net) and isinstance(net[0], GELU) \
                and net[0].approximate == "tanh" and _quantized(net[0].proj):
            down = net[-1] if into == "down" and _takes_input_gelu(net[-1]) else None
            net[0] = ProjectedGELU(net[0], down)
            n += 1
        act, proj = getattr(mod, "act_mlp", None), getattr(mod, "proj_mlp", None)
        if not (isinstance(act, nn.GELU) and act.approximate == "tanh" and _quantized(proj)):
            continue
        # a FLUX single block: proj_out reads [attention output | act_mlp(proj_mlp(x))]
        out = getattr(mod, "proj_out", None)
        if into == "down" and _takes_input_gelu(out) and out.in_features > proj.out_features:
            out.set_input_gelu(out.in_features - proj.out_features)
        elif peek(mod).stack is None:  # one stacked GEMM cannot apply a member's GELU
            proj.set_output_gelu(True)
        else:
            continue
        state(mod).act_mlp = act
        mod.act_mlp = nn.Identity()
        n += 1
    return n


def unfuse_gelu(model: nn.Module) -> int:
    n = 0
    for mod in list(model.modules()):
        net = getattr(mod, "net", None)
        if isinstance(net, nn.ModuleList) and len(net) and isinstance(net[0], ProjectedGELU):
            net[0] = net[0].restore()
            n += 1
        act = take(mod, "act_mlp")
        if act is not None:
            if mod.proj_mlp.output_gelu:
                mod.proj_mlp.set_output_gelu(False)
            else:
                mod.proj_out.set_input_gelu(None)
            mod.act_mlp = act
            n += 1
    return n


def set_compiled_activations(model: nn.Module, on: bool = True) -> int:
    """Under ``torch.compile``, quantize every INT8-activation layer's input in torch ops that inductor fuses into
    the kernel producing it (:meth:`SVDQLinear.set_compiled_activations`); returns how many layers changed."""
    n = 0
    for m in model.modules():
        af = get_format(m.activations) if isinstance(m, SVDQLinear) and m.activations is not None else None
        # A8: integer activations with one scale per token (the two-level A4 keeps its kernel)
        if af is not None and af.integer and af.group_sizes == (0,) and m.compiled_activations != on:
            m.set_compiled_activations(on)
            n += 1
    return n


def fuse(model: nn.Module, *, gelu: bool = True, compiled_activations: bool = False) -> dict[str, int]:
    """The run-time fusions: ``{"qkv": attentions stacked, "gelu": MLPs whose GELU moved into fc2's activation pass
    (or fc1's epilogue), "compiled_activations": layers whose A8 quantization inductor fuses into the input's producer
    (off until measured; pairs with ``gelu=False``)}``. FLUX.1's adaLN modulations ahead: :mod:`.modulations`."""
    done = {"qkv": fuse_projections(model), "gelu": fuse_gelu(model) if gelu else 0,
            "compiled_activations": set_compiled_activations(model) if compiled_activations else 0}
    bump_revision()  # forwards and modules were swapped: captured CUDA graphs are stale
    return done


def unfuse(model: nn.Module) -> dict[str, int]:
    done = {"qkv": unfuse_projections(model), "gelu": unfuse_gelu(model),
            "compiled_activations": set_compiled_activations(model, False)}
    bump_revision()
    return done


def stacks(model: nn.Module) -> list[FusedSVDQLinear]:
    """Every stack of ``model``: the fused projections among its submodules, then each FLUX single block's q/k/v + MLP
    stack, which the block's state holds (not a submodule)."""
    found = [m for m in model.modules() if isinstance(m, FusedSVDQLinear)]
    return found + [peek(b).stack for b in model.modules() if peek(b).stack is not None]


def _quantized(m) -> bool:
    return isinstance(m, SVDQLinear) and m.activations is not None


def _release(f: FusedSVDQLinear) -> None:
    """``f``'s members on their own again, each rebuilt on its own weights (not row views of the stack's)."""
    for m in f.members:
        m.set_stacked_in(None)
        m.refresh()
