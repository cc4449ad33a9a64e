"""Nunchaku's single-file INT4 checkpoints of FLUX.1 (dev, schnell, Kontext) and Qwen-Image (and -Edit), in and out
(issue 14, part 3; issue 26).

    model = svdquant.load_quantized("svdq-int4_r32-flux.1-dev.safetensors")      # import on load
    model = svdquant.load_quantized("svdq-int4_r32-qwen-image-edit.safetensors") # a QwenImageTransformer2DModel
    svdquant.convert.to_nunchaku("flux-w4a4f", "flux-nunchaku.safetensors")      # a w4a4-float checkpoint out
    svdquant convert nunchaku FILE.safetensors -o DIR     /     svdquant convert DIR --to nunchaku -o FILE

The format (facts from the public nunchaku repository: the layer names of ``src/FluxModel.cpp``, which
``convert_flux_state_dict`` in ``nunchaku/models/transformers/transformer_flux_v2.py`` maps to diffusers';
the metadata of ``nunchaku/merge_safetensors.py``; and deepcompressor's ``backend/nunchaku/convert.py``,
which writes the published checkpoints; the code here is ours):

* one safetensors file; header metadata ``config`` (the diffusers FLUX config as JSON),
  ``quantization_config`` (``{"method": "svdquant", "weight": {"dtype": "int4", "group_size": 64}, ...,
  "rank": R}``) and ``model_class``; tensors outside the blocks under diffusers' names, 16-bit;
* W4A4 layers (``qweight``, ``wscales``, ``bias``, ``smooth``, ``smooth_orig``, ``lora_down``, ``lora_up``;
  tensor layouts in :mod:`.packing`) compute ``Q((x + shift) / smooth) · Q(R)ᵀ + (x · down) · upᵀ +
  bias``: the branch reads the raw input, ``smooth`` divides, and the post-GELU shift (0.171875, inputs of
  ``mlp_fc2`` only, unsigned codes) is compensated in the bias. That is :class:`~svdquant.SVDQLinear` with
  ``w4a4-float`` formats and ``smooth_inv = 1 / smooth``. ``smooth_orig`` is not read by the kernels
  (for ``out_proj`` deepcompressor fuses the smoothing into the value projection and stores ``smooth = 1``);
* double block: ``qkv_proj`` (to_q | to_k | to_v stacked along N: split into our three layers, each with
  the shared smoothing and down projection and its rows of up, exact), ``qkv_proj_context``, ``out_proj``,
  ``out_proj_context``, ``mlp_fc1`` / ``mlp_fc2``, ``mlp_context_fc1`` / ``mlp_context_fc2``, and the
  ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k`` RMSNorm weights;
* single block: ``qkv_proj``, ``mlp_fc1`` (= proj_mlp), and diffusers' ``proj_out`` split along K into
  ``out_proj`` (the attention part, signed) and ``mlp_fc2`` (the GELU part, shifted, unsigned), their
  outputs summed. Our ``proj_out`` is one layer over both parts with ``act_unsigned_from = dim``: codes,
  scales and smoothing concatenate along K exactly (the parts end on a group boundary) and the biases add;
  the two branches become one of rank ``R`` (both ``lora_up`` equal: the down projections concatenate, the
  form we export) or ``2R`` (block-diagonal down, the ups side by side: published files);
* the adaLN modulation linears (``norm1.linear``, ``norm1_context.linear``, single ``norm.linear``) are AWQ
  W4A16 (``qweight`` / ``wscales`` / ``wzeros`` / ``bias``), output rows interleaved by chunk and the ``+ 1``
  of each scale chunk folded into the bias. Imported as our ``int4z`` format (or ``int4`` when every zero is
  ``-8 · scale``, which is how we export symmetric layers), rows and bias restored.

FLUX.1 Kontext files are FLUX files: Nunchaku loads them with the same classes (``examples/v1/flux.1-kontext-dev.py``)
into diffusers' ``FluxTransformer2DModel``. Qwen-Image files (``NunchakuQwenImageTransformer2DModel`` in
``nunchaku/models/transformers/transformer_qwenimage.py``, which also loads the -Edit, -Edit-2509 and Lightning
files) are the strictly loaded state dict of diffusers' ``QwenImageTransformer2DModel`` with its blocks patched:
the same kernels and tensor layouts, other names (:mod:`.keymap`): ``attn.to_qkv`` / ``attn.add_qkv_proj`` (q | k | v
along N), ``attn.to_out.0``, ``attn.to_add_out``, ``img_mlp`` / ``txt_mlp`` ``net.0.proj`` and ``net.2`` (post-GELU:
shifted, unsigned) as W4A4 with ``smooth_factor`` / ``smooth_factor_orig`` / ``proj_down`` / ``proj_up``; the
modulation ``img_mod.1`` / ``txt_mod.1`` as AWQ with six chunks interleaved and both scale chunks' ``+ 1`` in the bias
(the block runs with ``scale_shift=0``); ``attn.norm_q`` ... 16-bit. Which model a file holds: its metadata's
``model_class`` and its config's ``_class_name`` (they must agree), else its tensors. NVFP4 files are refused.

Exactness. Import is exact: every stored value keeps its bits (smoothing becomes ``1 / smooth`` in fp32; an adaLN
layer whose scale biases, stored as ``1 + b``, lie outside [0.5, 2] somewhere keeps its bias in fp32, since
``stored − 1`` then needs more bits than 16: published files have 38–85 such values per tensor).
Export is exact except for two things the format cannot hold: it stores the smoothing factor in 16 bits
(ours is fp32: rounded, relative change ≤ 2⁻⁹ in bf16), and it folds ``+ 1`` into the scale chunks' 16-bit
biases (rounded). Both are then fixed points: a model imported from a Nunchaku file exports back to the
same tensors, and re-imports to an identical state dict. (One exception: a published single block's
``out_proj`` and ``mlp_fc2`` biases are held as their sum and written back on ``out_proj``, ``mlp_fc2``'s
zero; the outputs they add up to are the same.)

Where things live: :mod:`.keymap` (Nunchaku's layer names against ours, per model), :mod:`.packing` (its tensor
layouts, with inverses); import: :mod:`.plan` (the header checked and worked out into a plan before any data is
read), then :mod:`.reader` (:func:`from_nunchaku`); export: :mod:`.exportable` (:func:`check_exportable`, from
the metadata alone), then :mod:`.writer` (:func:`nunchaku_tensors`, :func:`to_nunchaku`). Importing this package
registers the reader with :mod:`svdquant.checkpoint` (:class:`~svdquant.checkpoint.ForeignFormat`), so
``svdquant.load_quantized`` and ``svdquant.read_metadata`` take Nunchaku files; the checkpoint package never imports
this one.
"""

from ...checkpoint import ForeignFormat, register_foreign_format
from .exportable import check_exportable
from .keymap import is_nunchaku_header
from .plan import NunchakuPlan, nunchaku_metadata, nunchaku_plan
from .reader import from_nunchaku
from .writer import check_output_file, nunchaku_tensors, to_nunchaku

register_foreign_format(ForeignFormat("nunchaku", is_nunchaku_header, nunchaku_metadata, from_nunchaku))

__all__ = ["from_nunchaku", "to_nunchaku", "nunchaku_plan", "nunchaku_metadata", "nunchaku_tensors",
           "check_exportable", "check_output_file", "is_nunchaku_header", "NunchakuPlan"]
