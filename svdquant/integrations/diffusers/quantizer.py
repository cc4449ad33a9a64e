"""svdquant as a diffusers quantization backend (``quant_method: "svdquant"``).

Importing this module adds :class:`SVDQuantConfig` and :class:`SVDQuantQuantizer` to diffusers' quantizer
mappings (:func:`svdquant.integrations.diffusers.register`, at first use), which diffusers reads when
``from_pretrained`` meets a ``quantization_config`` in a model's ``config.json``; no diffusers file
is patched. Then, for a folder written by ``save_pretrained`` (any model svdquant quantized or loaded):

    transformer = FluxTransformer2DModel.from_pretrained("flux-int4-diffusers", subfolder="transformer")
    pipe = FluxPipeline.from_pretrained("flux-int4-diffusers")      # the whole pipeline, same folder layout
    transformer.save_pretrained("copy")                              # writes the same format back

diffusers builds the model on the meta device; :meth:`SVDQuantQuantizer._process_model_before_weight_loading`
swaps in empty ``SVDQLinear`` s there (so no 16-bit weight of a quantized layer is ever made), and
``create_quantized_param`` puts each stored tensor into its buffer unchanged: diffusers would cast
every floating tensor to ``torch_dtype``, but fp32 scales and 1/λ are part of the format.

Only pre-quantized checkpoints load this way: quantizing needs calibration (``svdquant.quantize``).
Tested with the diffusers range pinned in pyproject.toml (``compat.DIFFUSERS_TESTED``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..._state import state
from ...checkpoint import FORMAT_VERSION, CheckpointError, all_tensors, check_values, swap_quantized_layers
from ...modules import SVDQLinear
from ..quantization_config import SVDQuantMethod, fill_config, recipe_name
from . import compat

# a folder whose quantization_config cannot be read: what to do about it, at the end of the one-line error
REPAIR = ("; the folder's config.json is damaged: restore it, or write the folder again from the quantized model "
          "(svdquant.load_quantized(checkpoint).save_pretrained(folder))")


class SVDQuantConfig(QuantizationConfigMixin):
    """What ``config.json``'s ``quantization_config`` holds: the format version, the recipe, and every
    quantized layer's constructor arguments (as in ``svdquant.json``'s ``layers``)."""

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION,
                 recipe: dict | None = None, quant_method: str = "svdquant", **unknown):
        fill_config(self, layers, format_version, recipe, quant_method, unknown, REPAIR)

    def to_diff_dict(self) -> dict[str, Any]:  # the mixin's to_json_string asks for it but does not define it
        return self.to_dict()

    def __repr__(self) -> str:  # the mixin's repr prints every layer (hundreds for FLUX) into diffusers' logs
        return (f"SVDQuantConfig(format_version={self.format_version}, recipe={recipe_name(self.recipe)!r}, "
                f"{len(self.layers)} layers)")

    def model_dtype(self) -> torch.dtype:
        """The dtype the quantized model was made in (its layers' 16-bit buffers)."""
        names = {cfg.get("dtype", "bfloat16") for cfg in self.layers.values()}
        return getattr(torch, sorted(names)[0])


class SVDQuantQuantizer(DiffusersQuantizer):
    """Loads svdquant checkpoints saved in diffusers' layout (see the module doc)."""

    requires_calibration = True  # diffusers refuses to "quantize on load" with it: svdquant.quantize does that
    use_keep_in_fp32_modules = False

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
            raise ValueError("svdquant loads a model onto one device; pass device_map=None and .to(device)")

    def update_torch_dtype(self, torch_dtype):
        # None: the kept 16-bit layers load in the dtype the model was quantized in, as svdquant.load_quantized does
        return torch_dtype if torch_dtype is not None else self.quantization_config.model_dtype()

    def _layer_of(self, model: nn.Module, param_name: str) -> tuple[SVDQLinear | None, str]:
        owner, _, name = param_name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            return None, name
        return (module if isinstance(module, SVDQLinear) else None), name

    def check_if_quantized_param(self, model, param_value, param_name, state_dict, **kwargs) -> bool:
        return self._layer_of(model, param_name)[0] is not None

    def check_quantized_param_shape(self, param_name, current_param, loaded_param):
        if tuple(current_param.shape) != tuple(loaded_param.shape):
            raise CheckpointError(f"tensor {param_name!r} is {tuple(loaded_param.shape)}, the quantized layer "
                                  f"expects {tuple(current_param.shape)}; the checkpoint is corrupt")
        return True

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict, unexpected_keys=None,
                               **kwargs):
        layer, name = self._layer_of(model, param_name)
        stored = state_dict[param_name]  # param_value may have been cast to torch_dtype already
        want = layer._buffers[name]
        if stored.dtype != want.dtype or tuple(stored.shape) != tuple(want.shape):
            raise CheckpointError(f"tensor {param_name!r} is {tuple(stored.shape)} {stored.dtype}, the quantized layer "
                                  f"expects {tuple(want.shape)} {want.dtype}; the checkpoint is corrupt")
        # a copy: CPU tensors from a safetensors file are views at arbitrary offsets, and unaligned operands
        # make CPU GEMMs round differently from the model that was saved
        layer._buffers[name] = stored.to(target_device, copy=True)

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        try:
            swap_quantized_layers(model, self.quantization_config.layers, f"{type(model).__name__} quantization_config")
        except CheckpointError as e:
            raise CheckpointError(f"{e}{REPAIR}") from None
        state(model).recipe = self.quantization_config.recipe
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SVDQLinear)]
        empty = [f"{n}.{b}" for n, m in layers for b, t in m._buffers.items() if t is not None and t.is_meta]
        if empty:
            raise CheckpointError(f"the checkpoint lacks {len(empty)} tensors of quantized layers, e.g. {empty[:3]}")
        for mod in model.modules():  # kept layers: the same aligned copies as the quantized ones (see above)
            for store in (mod._parameters, mod._buffers):
                for k, t in store.items():
                    if t is not None and t.device.type == "cpu" and t.data_ptr() % 64:
                        store[k] = nn.Parameter(t.detach().clone(), t.requires_grad) if isinstance(
                            t, nn.Parameter) else t.clone()
        tensors = all_tensors(model)
        quantized = {f"{n}.{b}" for n, m in layers for b in m.state_dict()}
        check_values(model, tensors, quantized, type(model).__name__)
        for _, m in layers:
            m.refresh()  # the buffers were set directly: prepare what runs, as a load_state_dict would
        model.eval()
        if any(t.device.type == "cuda" for t in model.parameters()):  # loaded onto a GPU (device_map)
            from ...pipelines.optimize import optimize

            optimize(model)  # the default on CUDA, as load_pipeline does; svdquant.deoptimize(model) undoes it
        return model

    @property
    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False


# importing this module is using the backend: it registers at its end (also when its own imports are what loaded
# diffusers' quantizer mappings, and the registration hook finds it half imported)
compat.add_quantizer(SVDQuantMethod.SVDQUANT.value, SVDQuantQuantizer, SVDQuantConfig)
