"""Every place svdquant reaches into diffusers beyond its documented API, each a small named function.

The rest of the library calls these instead of touching diffusers' private names, so a diffusers upgrade is
checked here, against the range in :data:`DIFFUSERS_TESTED` (the pin in ``pyproject.toml``); outside it, the first
use warns once (:class:`DiffusersVersionWarning`). What lives here:

* the quantizer registry: :func:`add_quantizer` (diffusers' ``AUTO_*`` mappings, which have no public
  registration) and :func:`when_imported` (run a callback once a module has been imported, e.g. the module
  holding those mappings: importing it costs ~3 s, which ``import svdquant`` must not pay);
* quantized models: :func:`quantized`, called by whatever finishes a quantized model (``svdquant.quantize``,
  ``load_quantized``, the converters), runs the callbacks given to :func:`when_quantized` (the diffusers backend's
  ``attach``: ``save_pretrained`` then writes the ``quantization_config`` that ``from_pretrained`` needs);
* hooks: :func:`has_offload_hooks`, :func:`has_hooks`, :func:`forget_hook_registry_cache`;
* blocks: :func:`stacked_single_block_forward` (a FLUX single block's forward with one stacked projection),
  :func:`modulations_ahead_class` (FLUX.1's adaLN norms reading modulations computed ahead),
  :func:`set_qkv_fusion_supported`, :func:`repeated_block_names`;
* loading: :func:`dtype_keyword`;
* attention: :func:`add_attention_backend` (a backend of svdquant's in diffusers' attention dispatcher, whose
  names are a closed enum), :func:`native_attention_backend`, :func:`dispatches_attention` and
  :func:`set_attention_backend_locally`.

It imports only the standard library, torch and diffusers (inside functions: ``import svdquant`` stays fast).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import operator
import sys
import warnings
from typing import Callable

import torch

from ..._state import peek

# keep in step with pyproject.toml's diffusers pin; when bumping both, run tests/test_diffusers_quantizer.py,
# tests/test_fused.py and tests/test_offload.py
DIFFUSERS_TESTED = ">=0.42,<0.43"
QUANTIZER_AUTO = "diffusers.quantizers.auto"  # holds AUTO_QUANTIZER_MAPPING / AUTO_QUANTIZATION_CONFIG_MAPPING
ATTENTION_DISPATCH = "diffusers.models.attention_dispatch"  # AttentionBackendName, _AttentionBackendRegistry
# what diffusers adds to a quantized model's config: the quantizer's record, not the architecture
QUANTIZER_CONFIG_KEYS = ("quantization_config", "_pre_quantization_dtype")


class DiffusersVersionWarning(UserWarning):
    """The installed diffusers is outside :data:`DIFFUSERS_TESTED`: the internals used here may have changed."""


_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}
_WARNED: set[str] = set()


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: "0.43.0.dev0" -> (0, 43, 0)."""
    out = []
    for part in version.strip().split("."):
        digits = part[:len(part) - len(part.lstrip("0123456789"))]
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


def in_tested_range(version: str, spec: str = DIFFUSERS_TESTED) -> bool:
    for clause in (c.strip() for c in spec.split(",")):
        op = next(o for o in _OPS if clause.startswith(o))
        if not _OPS[op](_release(version), _release(clause[len(op):])):
            return False
    return True


@functools.cache
def _installed_diffusers() -> str | None:
    """The installed diffusers' version, read from its metadata once (every fuse of a block asks)."""
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version(version: str | None = None) -> bool:
    """Whether diffusers ``version`` (``None``: the installed one) is in the tested range; warns once if not."""
    if version is None:
        version = _installed_diffusers()
        if version is None:
            return True  # a source checkout without metadata: nothing to compare
    if in_tested_range(version):
        return True
    if version not in _WARNED:
        _WARNED.add(version)
        warnings.warn(f"diffusers {version} is outside the range svdquant is tested with ({DIFFUSERS_TESTED}); "
                      "its quantizer backend and fused FLUX blocks use diffusers internals that may have changed "
                      "(svdquant/integrations/diffusers/compat.py)", DiffusersVersionWarning, stacklevel=3)
    return False


# --- the quantizer registry ---------------------------------------------------------------------------------------

class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of one module to run a callback after it has run."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # one shot, and so the lookup below finds the real spec
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        real_exec, callback = spec.loader.exec_module, self.callback

        def exec_module(module):
            real_exec(module)
            callback()

        spec.loader.exec_module = exec_module
        return spec


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """``callback()`` now if module ``name`` is imported, else right after it is (once)."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.name == name and f.callback is callback for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))


def add_quantizer(method: str, quantizer_cls: type, config_cls: type) -> None:
    """``quant_method: method`` in a config.json loads through ``quantizer_cls`` (idempotent)."""
    check_version()
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING.setdefault(method, quantizer_cls)
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(method, config_cls)


# --- quantized models ---------------------------------------------------------------------------------------------

_ON_QUANTIZED: list[Callable[[torch.nn.Module], object]] = []


def when_quantized(callback: Callable[[torch.nn.Module], object]) -> None:
    """Run ``callback(model)`` on every model :func:`quantized` is called on (idempotent)."""
    if callback not in _ON_QUANTIZED:
        _ON_QUANTIZED.append(callback)


def quantized(model: torch.nn.Module) -> torch.nn.Module:
    """A model svdquant just quantized, loaded or converted: make it save and load the diffusers way
    (``model.save_pretrained(d)`` then ``<Model>.from_pretrained(d)``) with no further call."""
    for callback in _ON_QUANTIZED:
        callback(model)
    return model


# --- hooks --------------------------------------------------------------------------------------------------------

def has_offload_hooks(module: torch.nn.Module) -> bool:
    """accelerate's hooks (``enable_model_cpu_offload``...) or diffusers' group offloading on ``module``."""
    if hasattr(module, "_hf_hook"):
        return True
    if not hasattr(module, "_diffusers_hook"):
        return False
    check_version()
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(module)


def has_hooks(module: torch.nn.Module) -> bool:
    """Any accelerate hook or diffusers hook (offloading, caches) on ``module`` itself. Called per step: no import."""
    return "_hf_hook" in module.__dict__ or bool(getattr(module.__dict__.get("_diffusers_hook"), "hooks", None))


def forget_hook_registry_cache(model: torch.nn.Module) -> None:
    """Leave diffusers' hook registry as an uncalled pipeline has it.

    diffusers 0.42 caches, on the first ``cache_context()`` (FluxPipeline opens one per step), the list of
    hook registries under the transformer (``HookRegistry._get_child_registries`` in ``hooks/hooks.py``),
    and only ``enable_cache()`` clears it: a First-Block Cache added with ``apply_first_block_cache``
    after any pipeline call, our calibration's included, then fails with "No cache context is set".
    """
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


# --- blocks -------------------------------------------------------------------------------------------------------

# False: a compiled stacked single block normalizes the concatenation of its streams, as diffusers does (the A/B:
# benchmarks/flux_step.py's int4-fused-joint)
NORM_PER_STREAM = True
_ZERO_SINGLE = ("diffusers.models.normalization", "AdaLayerNormZeroSingle")  # by name: no import in a forward


def stacked_single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                                 joint_attention_kwargs=None):
    """diffusers' ``FluxSingleTransformerBlock.forward`` (0.42) with q/k/v and ``proj_mlp`` as one GEMM: the
    stacked layer svdquant.modules.fused keeps on the block; the attention reads the projections it is handed. A
    quantized ``proj_out`` takes the attention output and the MLP's as two parts (``SVDQLinear.forward``'s
    ``tail``) instead of their concatenation. Compiled, each stream is normalized on its own and adds its own
    residual (:func:`_normed_streams`): the same values, without the streams' concatenation in memory."""
    text_seq_len = encoder_hidden_states.shape[1]
    normed = _normed_streams(self.norm, encoder_hidden_states, hidden_states, temb)
    if normed is None:
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        norm_hidden_states, gate = self.norm(residual, emb=temb)
    else:
        norm_hidden_states, gate = normed
    stacked = peek(self).stack
    mlp_width = self.proj_mlp.out_features
    qkv, mlp = stacked(norm_hidden_states).split([stacked.out_features - mlp_width, mlp_width], dim=-1)
    mlp_hidden_states = self.act_mlp(mlp)
    attn_output = self.attn(hidden_states=qkv, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    if getattr(self.proj_out, "takes_tail", False):  # a quantized proj_out reads both parts: no concatenated copy
        out = self.proj_out(attn_output, tail=mlp_hidden_states)
    else:
        out = self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
    gate = gate.unsqueeze(1)
    if normed is None:
        hidden_states = residual + gate * out
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    streams = (encoder_hidden_states + gate * out[:, :text_seq_len], hidden_states + gate * out[:, text_seq_len:])
    if streams[1].dtype == torch.float16:
        streams = tuple(s.clip(-65504, 65504) for s in streams)
    return streams


def _normed_streams(norm, text, image, temb):
    """``norm(cat([text, image]), emb=temb)`` of a FLUX single block's ``AdaLayerNormZeroSingle`` (or its
    modulations-ahead class) computed per stream: its LayerNorm is per token and its modulation per image, so the
    values are the same. Why: inductor writes out a concatenation that a reduction reads (two sources per element),
    and the block then kept it as its residual, one more write of the joint activation a block (28 MB at 1024²) than
    normalizing each stream into its part of the stacked GEMM's input. None (the caller concatenates, as diffusers
    does) where the norm is another class, hooked in any way (its own forward must run; hooks go on before
    compiling, as for any module: dynamo skips hook guards, ``torch._dynamo.config.skip_nnmodule_hook_guards``), the
    streams' dtypes differ (the concatenation promotes), and eagerly: there the same bytes move either way, in six
    more launches a block (dynamo folds ``is_compiling`` to a constant)."""
    ahead = type(norm).forward is _ahead_zero_single
    if not (NORM_PER_STREAM and torch.compiler.is_compiling()) or text.dtype != image.dtype or \
            not (ahead or _ZERO_SINGLE == (type(norm).__module__, type(norm).__name__)) or has_hooks(norm) or \
            "forward" in norm.__dict__ or norm._forward_hooks or norm._forward_pre_hooks:
        return None
    if ahead:
        shift, scale, gate = _ahead_row(norm, temb).chunk(3, dim=1)
    else:
        shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    parts = [norm.norm(x) * (1 + scale[:, None]) + shift[:, None] for x in (text, image)]
    return torch.cat(parts, dim=1), gate


def _ahead_row(self, emb):
    """This norm's modulations in ``emb``, where svdquant.modules.modulations computed every block's ahead: row
    ``svdq_row`` (a one-element buffer) of its norm type's region ``svdq_region`` (``(first column, rows)``, the
    same ints for every norm of the type, so a regional compile traces the type once). One scalar index: gathering
    18,432 columns through an index per column put an index load on every element of each consumer (a FLUX.1-dev
    step 2.3 ms slower, BENCHMARKS.md "Session 29")."""
    first, rows = self.svdq_region
    region = emb[:, first:first + rows * self.linear.out_features].unflatten(1, (rows, self.linear.out_features))
    return region.index_select(1, self.svdq_row).squeeze(1)


def _ahead_zero(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    """diffusers' ``AdaLayerNormZero.forward`` (0.42, without its own embedder) reading its six modulations from
    ``emb`` (:func:`_ahead_row`) instead of running its linear."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ahead_row(self, emb).chunk(6, dim=1)
    x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ahead_zero_single(self, x, emb=None):
    """diffusers' ``AdaLayerNormZeroSingle.forward`` (0.42) reading its modulations from ``emb``
    (:func:`_ahead_row`)."""
    shift_msa, scale_msa, gate_msa = _ahead_row(self, emb).chunk(3, dim=1)
    x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa


def _ahead_continuous(self, x, conditioning_embedding):
    """diffusers' ``AdaLayerNormContinuous.forward`` (0.42) whose ``conditioning_embedding`` starts with
    ``silu(temb)`` (``self.svdq_width`` columns) already: its linear reads those."""
    emb = self.linear(conditioning_embedding[:, :self.svdq_width].to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


_AHEAD_FORWARDS = {"AdaLayerNormZero": _ahead_zero, "AdaLayerNormZeroSingle": _ahead_zero_single,
                   "AdaLayerNormContinuous": _ahead_continuous}


@functools.cache
def modulations_ahead_class(cls: type) -> type:
    """A subclass of diffusers' FLUX.1 norm class ``cls`` whose forward reads modulations computed ahead: its row
    ``svdq_row`` (a one-element buffer) of its type's region ``svdq_region`` of ``emb``, or, for
    ``AdaLayerNormContinuous``, with its linear over the first ``svdq_width`` columns. A norm's class is swapped to
    it, not its forward replaced per instance: a regional compile guards a forward attribute by object identity and
    would compile the block again for each of FLUX.1-dev's 57 blocks (past dynamo's recompile limit)."""
    return type(f"{cls.__name__}Ahead", (cls,), {"forward": _AHEAD_FORWARDS[cls.__name__], "__module__": __name__})


def set_qkv_fusion_supported(attn: torch.nn.Module, supported: bool) -> None:
    """``False``: diffusers' (un)fuse_qkv_projections leave this attention alone (its ``to_qkv`` is not a projection;
    diffusers' own convention for always-fused attentions, e.g. Flux2's single blocks). ``True``: its class's
    default."""
    if supported:
        attn.__dict__.pop("_supports_qkv_fusion", None)
    else:
        check_version()
        attn._supports_qkv_fusion = False


def repeated_block_names(model: torch.nn.Module) -> set[str]:
    """The class names of the blocks a diffusers model repeats (what its ``compile_repeated_blocks`` compiles)."""
    return set(getattr(model, "_repeated_blocks", None) or ())


# --- loading ------------------------------------------------------------------------------------------------------

def dtype_keyword() -> str:
    """``dtype`` on diffusers that renamed ``torch_dtype`` (and warn about the old name), else ``torch_dtype``."""
    check_version()
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


# --- attention ----------------------------------------------------------------------------------------------------

def add_attention_backend(value: str, fn: Callable) -> None:
    """Make ``model.set_attention_backend(value)`` route a diffusers model's attention to ``fn`` (idempotent).

    diffusers 0.42 names its backends in the enum ``AttentionBackendName`` and checks a name against its members
    (``ModelMixin.set_attention_backend``, ``dispatch_attention_fn``), with no way to add one: the member is added
    here as ``enum.Enum`` stores members (``_member_map_``, ``_value2member_map_``, ``_member_names_``), then
    registered with ``_AttentionBackendRegistry.register`` as diffusers registers its own. ``fn`` takes diffusers'
    backend signature (``query``, ``key``, ``value`` in ``[B, S, H, D]``, ``attn_mask``, ...)."""
    check_version()
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = AttentionBackendName._value2member_map_.get(value)
    if member is None:
        member = str.__new__(AttentionBackendName, value)
        member._name_, member._value_ = value.upper(), value
        member.__objclass__ = AttentionBackendName
        type.__setattr__(AttentionBackendName, member._name_, member)
        AttentionBackendName._member_map_[member._name_] = member
        AttentionBackendName._value2member_map_[value] = member
        AttentionBackendName._member_names_.append(member._name_)
    if _AttentionBackendRegistry._backends.get(member) is not fn:
        _AttentionBackendRegistry.register(member)(fn)


def native_attention_backend() -> Callable:
    """diffusers' own ``native`` attention backend (PyTorch's SDPA), with its backend signature."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]


def dispatches_attention(model: torch.nn.Module) -> bool:
    """Whether any attention of ``model`` runs through diffusers' attention backends: its processor carries the
    ``_attention_backend`` that ``set_attention_backend`` writes (diffusers 0.42's own check). diffusers' legacy
    processors (``AttnProcessor2_0`` and kin: SD3, PixArt-Σ, SANA, the SDXL UNet) call PyTorch's SDPA themselves."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in model.modules())


def set_attention_backend_locally(model: torch.nn.Module, value: str) -> None:
    """``model.set_attention_backend(value)`` without its side effect on every other model: diffusers 0.42 also
    makes ``value`` the process's active backend, which attention modules left on the default then use."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    try:
        model.set_attention_backend(value)
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


# diffusers 0.42's backends that transpose q/k/v to [B, H, S, D] before their kernel (attention_dispatch.py: the
# native SDPA ones, flex, and the Blackwell SageAttention hub kernel); the others (flash, the other sage ones,
# xformers, svdquant's) read [B, S, H, D] as given
HEADS_FIRST_BACKENDS = frozenset({"native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math",
                                  "_native_xla", "flex", "sage_blackwell_hub"})


@functools.cache
def _backend_registry():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry


def attention_reads_heads_first(backend) -> bool:
    """Whether diffusers' attention ``backend`` (a processor's ``_attention_backend``; None: the process's active
    one) runs its kernel on q/k/v transposed to ``[B, H, S, D]``. Asked by a processor at every call: no import
    after the first."""
    if backend is None:
        backend = _backend_registry()._active_backend
    return getattr(backend, "value", backend) in HEADS_FIRST_BACKENDS
