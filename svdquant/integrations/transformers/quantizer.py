"""svdquant as a transformers quantization backend (``quant_method: "svdquant"``): quantized text encoders.

Importing this module registers :class:`SVDQuantTextConfig` and :class:`SVDQuantHfQuantizer` with transformers'
``register_quantization_config`` / ``register_quantizer`` (:func:`svdquant.integrations.transformers.register`, at
first use). transformers reads them when ``from_pretrained`` meets a ``quantization_config`` in a model's
config.json (``transformers/quantizers/auto.py``: ``get_hf_quantizer``). Then a text encoder saved with
``save_pretrained`` (any svdquant quantized or loaded) loads with plain transformers or diffusers calls:

    te = T5EncoderModel.from_pretrained("flux-w4a16/text_encoder_2")
    pipe = FluxPipeline.from_pretrained("flux-w4a16")                 # the whole saved pipeline

transformers 5 builds the model on the meta device and hands the quantizer the checkpoint files;
:meth:`SVDQuantHfQuantizer._process_model_before_weight_loading` swaps in empty ``SVDQLinear`` s there (no 16-bit
weight of a quantized layer is made) and checks, from the files' headers alone, that every tensor they need is
stored with their exact shape and dtype: a truncated or mismatched file fails in one line naming the file and
the layer, where transformers would report it missing and initialize it at random. transformers then assigns each
stored tensor to the buffer of that name unchanged (in the empty buffer's dtype: ``core_model_loading.py``);
:meth:`~SVDQuantHfQuantizer._process_model_after_weight_loading` checks and prepares the layers.

Only pre-quantized checkpoints load this way (``requires_calibration``): ``svdquant.quantize_text_encoders``
quantizes. The versions it works with: :mod:`.compat`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
# transformers' submodules, not its package: registration can run while transformers.modeling_utils, which
# imports quantizers.auto, is still being imported
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..._state import state
from ...checkpoint import FORMAT_VERSION, CheckpointError, all_tensors, check_tensor_file, check_values
from ...checkpoint import swap_quantized_layers
from ...modules import SVDQLinear
from ..quantization_config import SVDQuantMethod, fill_config, recipe_name
from . import compat

# a folder whose quantization_config cannot be read: what to do about it, at the end of the one-line error
REPAIR = ("; the folder's config.json is damaged: restore it, or write the folder again from the quantized "
          "pipeline (pipe.save_pretrained(folder))")
# safetensors' dtype names (its format's spec) for the dtypes a quantized layer's buffers have
SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}

# what a quantized layer shows as `weight` while transformers initializes the model: nothing to initialize
_PLACEHOLDER = torch.empty(0, device="meta")


class SVDQuantTextConfig(QuantizationConfigMixin):
    """What a text encoder's config.json ``quantization_config`` holds: the format version, the recipe, and every
    quantized layer's constructor arguments (as in ``svdquant.json``'s ``layers``)."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION,
                 recipe: dict | None = None, quant_method: str = "svdquant", **unknown):
        fill_config(self, layers, format_version, recipe, quant_method, unknown, REPAIR)

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        # what transformers calls on reading a config.json that names the method: the version check comes first
        compat.require("loading a text encoder svdquant quantized")
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __repr__(self) -> str:  # the mixin's repr prints every layer into transformers' logs
        return (f"SVDQuantTextConfig(format_version={self.format_version}, recipe={recipe_name(self.recipe)!r}, "
                f"{len(self.layers)} layers)")


class SVDQuantHfQuantizer(HfQuantizer):
    """Loads svdquant text encoders saved by ``save_pretrained`` (see the module doc)."""

    requires_calibration = True  # transformers refuses to "quantize on load" with it: svdquant quantizes

    def __init__(self, quantization_config: SVDQuantTextConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._dtypes: dict[str, torch.dtype] = {}  # tensor name -> the dtype its quantized layer holds it in
        self._where = "the text encoder"  # the folder loaded from, for the messages

    def validate_environment(self, *args, **kwargs):
        compat.require("loading a text encoder svdquant quantized")
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
            raise ValueError("svdquant loads a text encoder onto one device; pass device_map=None and .to(device)")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        where = self._where = _folder_of(checkpoint_files) or type(model).__name__
        try:
            swap_quantized_layers(model, self.quantization_config.layers, f"{where} quantization_config")
        except CheckpointError as e:
            raise CheckpointError(f"{e}{REPAIR}") from None
        expected = {f"{name}.{b}": t for name in self.quantization_config.layers
                    for b, t in model.get_submodule(name).state_dict(keep_vars=True).items()}
        _check_stored(expected, checkpoint_files, type(model).__name__)
        self._dtypes = {k: t.dtype for k, t in expected.items()}
        for name in self.quantization_config.layers:
            # transformers runs the model's _init_weights on every module not marked loaded, and T5's / CLIP's read
            # the weight of their attention's and MLP's linears by name (their init calls then skip loaded tensors:
            # transformers/initialization.py): an empty placeholder until the layers are filled, removed after
            vars(model.get_submodule(name))["weight"] = _PLACEHOLDER
        state(model).recipe = self.quantization_config.recipe
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ...models.text_encoders import fit_quantized

        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SVDQLinear)]
        for n, m in layers:
            if vars(m).get("weight") is _PLACEHOLDER:
                del vars(m)["weight"]
            for b, t in m._buffers.items():
                if t is None:
                    continue
                if t.is_meta:
                    raise CheckpointError(f"{self._where}: transformers did not fill {n}.{b} of quantized layer {n!r}")
                m._buffers[b] = _as_stored(f"{n}.{b}", t, self._dtypes.get(f"{n}.{b}", t.dtype))
        _align(model)
        tensors = all_tensors(model)
        quantized = {f"{n}.{b}" for n, m in layers for b in m.state_dict()}
        check_values(model, tensors, quantized, self._where)
        fit_quantized(model)
        for _, m in layers:
            m.refresh()  # the buffers were set directly: prepare what runs, as a load_state_dict would
        return model.eval()

    def is_serializable(self, *args, **kwargs) -> bool:
        # transformers 5's save_pretrained calls it; below the supported versions it refuses the save, whose
        # folder that transformers could not load back
        compat.require("save_pretrained of a text encoder svdquant quantized")
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _folder_of(files) -> str | None:
    if not files:
        return None
    from pathlib import Path

    return str(Path(files[0]).parent)


def _check_stored(expected: dict[str, torch.Tensor], files, model_class: str) -> None:
    """Every tensor of the quantized layers stored in ``files`` (safetensors) with the layer's shape and dtype,
    read from the headers (checked against their files' lengths) before transformers reads any tensor."""
    if not files:
        raise CheckpointError(f"{model_class}: transformers named no weight file to load the quantized layers from "
                              "(a state_dict= argument?); load the saved folder itself")
    stored: dict[str, tuple[str, dict]] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise CheckpointError(f"{f}: svdquant's quantized layers load from safetensors files only; save the "
                                  "text encoder again with save_pretrained (safe_serialization, the default)")
        header = check_tensor_file(f)
        header.pop("__metadata__", None)
        stored.update({k: (str(f), v) for k, v in header.items()})
    where = str(files[0]) if len(files) == 1 else f"{_folder_of(files)} ({len(files)} files)"
    for key, want in expected.items():
        layer = key.rpartition(".")[0]
        if key not in stored:
            raise CheckpointError(f"{where} lacks {key!r} of quantized layer {layer!r}; the file is truncated or is "
                                  "not the one its config.json was saved with")
        f, entry = stored[key]
        shape, dtype = tuple(entry["shape"]), entry["dtype"]
        if shape != tuple(want.shape) or dtype != SAFETENSORS_DTYPES.get(want.dtype):
            raise CheckpointError(f"{f}: {key!r} of quantized layer {layer!r} is {shape} {dtype}, the layer holds "
                                  f"{tuple(want.shape)} {SAFETENSORS_DTYPES.get(want.dtype, want.dtype)}; the file is "
                                  "not the one its config.json was saved with")


def _as_stored(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized layer's tensor back in the dtype it was stored in. transformers upcasts the modules a model keeps
    in fp32 when loading in fp16 (``_keep_in_fp32_modules``: T5's ``wo``; ``PreTrainedModel._get_dtype_plan``):
    from a stored 16-bit scale that is exact, and casting back restores the stored bits."""
    if t.dtype == dtype:
        return t
    if t.is_floating_point() and dtype.is_floating_point and t.dtype.itemsize > dtype.itemsize:
        return t.to(dtype)
    raise CheckpointError(f"{name} loaded as {t.dtype}, the quantized layer holds {dtype}; transformers "
                          f"{compat.installed_version()} changed how it loads (see {compat.__name__})")


def _align(model: nn.Module) -> None:
    """CPU tensors read from a safetensors file can be views at arbitrary offsets, and unaligned operands make CPU
    GEMMs round differently from the model that was saved: such tensors get aligned copies (a tied weight, T5's
    token embedding, one copy for all its names)."""
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (the original, kept alive: ids stay unique)
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is None or t.device.type != "cpu" or not t.data_ptr() % 64:
                    continue
                if id(t) not in copies:
                    copies[id(t)] = t, (nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(
                        t, nn.Parameter) else t.clone())
                store[k] = copies[id(t)][1]


# importing this module is using the backend: it registers at its end (also when its own imports are what loaded
# transformers' quantizer mappings)
compat.add_quantizer(SVDQuantMethod.SVDQUANT.value, SVDQuantHfQuantizer, SVDQuantTextConfig)
