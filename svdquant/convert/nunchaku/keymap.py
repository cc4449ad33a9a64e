"""Nunchaku's FLUX layer names against diffusers' (ours): which Nunchaku layer makes which of our layers, in a
double and a single block, and the 16-bit tensors in the blocks; what a Nunchaku header looks like."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = 64
NUNCHAKU_CLASS = "NunchakuFluxTransformer2dModel"  # what merge_safetensors records for FLUX
MODEL_CLASS = "FluxTransformer2DModel"
STACKS = ("transformer_blocks", "single_transformer_blocks")
W4A4_TENSORS = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")
AWQ_TENSORS = ("qweight", "wscales", "wzeros", "bias")


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


_DOUBLE = (
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
_SINGLE = (
    W4A4(("qkv_proj",), ("attn.to_q", "attn.to_k", "attn.to_v")),
    W4A4(("mlp_fc1",), ("proj_mlp",)),
    W4A4(("out_proj", "mlp_fc2"), ("proj_out",), post_gelu=True),
    AWQ("norm.linear", "norm.linear", 3),
)
# 16-bit tensors inside the blocks: Nunchaku name -> ours
KEPT = {
    "transformer_blocks": {"norm_q.weight": "attn.norm_q.weight", "norm_k.weight": "attn.norm_k.weight",
                           "norm_added_q.weight": "attn.norm_added_q.weight",
                           "norm_added_k.weight": "attn.norm_added_k.weight"},
    "single_transformer_blocks": {"norm_q.weight": "attn.norm_q.weight", "norm_k.weight": "attn.norm_k.weight"},
}
PLANS = {"transformer_blocks": _DOUBLE, "single_transformer_blocks": _SINGLE}


def is_nunchaku_header(metadata: dict[str, str]) -> bool:
    """A safetensors ``__metadata__`` written by Nunchaku's tools (and not by svdquant)."""
    return "svdquant" not in metadata and ("quantization_config" in metadata or
                                          str(metadata.get("model_class", "")).startswith("Nunchaku"))
