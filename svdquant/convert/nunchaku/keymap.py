"""Nunchaku's layer names against diffusers' (ours), per model: which Nunchaku layer makes which of our layers in
a block, the 16-bit tensors in the blocks, what the W4A4 tensors are called; what a Nunchaku header looks like.

Two layouts (facts from the public nunchaku repository):

* FLUX.1 [dev] / [schnell] / Kontext: the C++ engine's layer names (``src/FluxModel.cpp``), which
  ``convert_flux_state_dict`` in ``nunchaku/models/transformers/transformer_flux_v2.py`` maps to diffusers'.
  Kontext files load through the same classes (``examples/v1/flux.1-kontext-dev.py``,
  ``tests/v1/flux/test_flux1_kontext_dev.py``) into the same ``FluxTransformer2DModel``: one layout.
* Qwen-Image (and -Edit, -Edit-2509, their Lightning merges: ``examples/v1/qwen-image*.py`` load them all with
  ``NunchakuQwenImageTransformer2DModel``): the state dict of the patched diffusers model of
  ``nunchaku/models/transformers/transformer_qwenimage.py``, loaded strictly, so diffusers' names except
  where Nunchaku fuses (``attn.to_qkv`` = to_q | to_k | to_v, ``attn.add_qkv_proj`` = add_q | add_k | add_v:
  ``fuse_linears`` in ``nunchaku/models/utils.py`` stacks along N, and ``attention_processors/qwenimage.py``
  splits with ``chunk(3)``), and the Python ``SVDQW4A4Linear``'s tensor names (``nunchaku/models/linear.py``):
  ``smooth_factor``, ``smooth_factor_orig``, ``proj_down``, ``proj_up`` for the engine's ``smooth``,
  ``smooth_orig``, ``lora_down``, ``lora_up`` (the renaming ``convert_flux_state_dict`` does, values unchanged:
  the same kernels read the same layouts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROUP = 64
W4A4_ROLES = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")


@dataclass(frozen=True)
class W4A4:
    """Nunchaku W4A4 layer(s) -> our layer(s): ``theirs`` concatenated along K (the single block's
    out_proj | mlp_fc2 -> proj_out), ``ours`` stacked along N (qkv_proj -> to_q, to_k, to_v)."""
    theirs: tuple[str, ...]
    ours: tuple[str, ...]
    post_gelu: bool = False  # the (last) Nunchaku layer reads a GELU output: shifted, unsigned


@dataclass(frozen=True)
class AWQ:
    theirs: str
    ours: str
    chunks: int


@dataclass(frozen=True)
class Layout:
    """One model's Nunchaku single-file layout."""
    label: str                        # in messages: "FLUX", "Qwen-Image"
    model_class: str                  # the diffusers class the file's ``config`` builds (ours)
    nunchaku_class: str               # Nunchaku's loader class, as metadata ``model_class`` names it
    marker: str                       # a Nunchaku class naming this model contains it
    stacks: tuple[str, ...]
    counts: tuple[str, ...]           # the config key giving each stack's length
    plans: dict[str, tuple]           # stack -> the W4A4 / AWQ layers of one block
    kept: dict[str, dict[str, str]]   # stack -> 16-bit tensors in a block: Nunchaku name -> ours
    names: dict[str, str] = field(default_factory=dict)  # W4A4 role -> tensor name, where not the role itself
    strict: bool = False              # Nunchaku's loader needs every tensor of its W4A4 layers (branch included)

    def w4a4(self, layer: str, role: str) -> str:
        return f"{layer}.{self.names.get(role, role)}"


_FLUX_DOUBLE = (
    W4A4(("qkv_proj",), ("attn.to_q", "attn.to_k", "attn.to_v")),
    W4A4(("qkv_proj_context",), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    W4A4(("out_proj",), ("attn.to_out.0",)),
    W4A4(("out_proj_context",), ("attn.to_add_out",)),
    W4A4(("mlp_fc1",), ("ff.net.0.proj",)),
    W4A4(("mlp_fc2",), ("ff.net.2",), post_gelu=True),
    W4A4(("mlp_context_fc1",), ("ff_context.net.0.proj",)),
    W4A4(("mlp_context_fc2",), ("ff_context.net.2",), post_gelu=True),
    AWQ("norm1.linear", "norm1.linear", 6),
    AWQ("norm1_context.linear", "norm1_context.linear", 6),
)
_FLUX_SINGLE = (
    W4A4(("qkv_proj",), ("attn.to_q", "attn.to_k", "attn.to_v")),
    W4A4(("mlp_fc1",), ("proj_mlp",)),
    W4A4(("out_proj", "mlp_fc2"), ("proj_out",), post_gelu=True),
    AWQ("norm.linear", "norm.linear", 3),
)
FLUX = Layout(
    "FLUX", "FluxTransformer2DModel", "NunchakuFluxTransformer2dModel", "Flux",  # what merge_safetensors records
    ("transformer_blocks", "single_transformer_blocks"), ("num_layers", "num_single_layers"),
    {"transformer_blocks": _FLUX_DOUBLE, "single_transformer_blocks": _FLUX_SINGLE},
    {"transformer_blocks": {"norm_q.weight": "attn.norm_q.weight", "norm_k.weight": "attn.norm_k.weight",
                            "norm_added_q.weight": "attn.norm_added_q.weight",
                            "norm_added_k.weight": "attn.norm_added_k.weight"},
     "single_transformer_blocks": {"norm_q.weight": "attn.norm_q.weight", "norm_k.weight": "attn.norm_k.weight"}},
)

# NunchakuQwenImageTransformerBlock: img_mod.1 / txt_mod.1 are AWQW4A16Linear read as view(B, D, 6) (chunks
# interleaved, as FLUX's norm1.linear) with scale_shift=0 (the + 1 of both scale chunks folded into the bias);
# NunchakuFeedForward marks net.2 act_unsigned for INT4 (the post-GELU shift of the fused GELU-MLP kernel).
_QWEN_BLOCK = (
    W4A4(("attn.to_qkv",), ("attn.to_q", "attn.to_k", "attn.to_v")),
    W4A4(("attn.add_qkv_proj",), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    W4A4(("attn.to_out.0",), ("attn.to_out.0",)),
    W4A4(("attn.to_add_out",), ("attn.to_add_out",)),
    W4A4(("img_mlp.net.0.proj",), ("img_mlp.net.0.proj",)),
    W4A4(("img_mlp.net.2",), ("img_mlp.net.2",), post_gelu=True),
    W4A4(("txt_mlp.net.0.proj",), ("txt_mlp.net.0.proj",)),
    W4A4(("txt_mlp.net.2",), ("txt_mlp.net.2",), post_gelu=True),
    AWQ("img_mod.1", "img_mod.1", 6),
    AWQ("txt_mod.1", "txt_mod.1", 6),
)
_QWEN_NORMS = ("attn.norm_q.weight", "attn.norm_k.weight", "attn.norm_added_q.weight", "attn.norm_added_k.weight")
QWENIMAGE = Layout(
    "Qwen-Image", "QwenImageTransformer2DModel", "NunchakuQwenImageTransformer2DModel", "QwenImage",
    ("transformer_blocks",), ("num_layers",), {"transformer_blocks": _QWEN_BLOCK},
    {"transformer_blocks": {n: n for n in _QWEN_NORMS}},  # NunchakuQwenAttention keeps diffusers' norms
    names={"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig", "lora_down": "proj_down",
           "lora_up": "proj_up"},
    strict=True,  # from_pretrained: load_state_dict(strict) into SVDQW4A4Linear, which always holds all seven
)
LAYOUTS = {lay.model_class: lay for lay in (FLUX, QWENIMAGE)}
KNOWN = " and ".join(f"{lay.label} ({lay.nunchaku_class})" for lay in LAYOUTS.values())


def is_nunchaku_header(metadata: dict[str, str]) -> bool:
    """A safetensors ``__metadata__`` written by Nunchaku's tools (and not by svdquant)."""
    return "svdquant" not in metadata and ("quantization_config" in metadata or
                                          str(metadata.get("model_class", "")).startswith("Nunchaku"))
