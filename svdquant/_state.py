"""What svdquant remembers about the user's objects: one record per object, in one attribute.

A model the quantizer made, a checkpoint loaded, a LoRA added, a pipeline optimized, a block fused: each leaves
facts that later calls need (``save_quantized`` writes the recipe; ``set_lora_strength`` finds the LoRA; ``unfuse``
puts the processor back). They live in a :class:`State` stored in the object's ``__dict__`` under ``_svdquant``,
not as attributes set through ``nn.Module.__setattr__``: a module held there (a fused stack) is then not
registered as a child, so it never reaches ``state_dict``, ``.to()``, ``named_modules`` or a saved checkpoint.

Which object carries which field:

| field | on | set by | read by |
| --- | --- | --- | --- |
| ``recipe`` | a quantized model or text encoder | quantize, load_quantized, the Nunchaku / two-level imports, diffusers' and transformers' from_pretrained | save_quantized, the model card, info, the quantization_config |
| ``source`` | a loaded model | load_quantized (``"nunchaku"`` for an import) | save_quantized, export |
| ``loras`` | a quantized model | load_lora / set_lora_strength / unload_lora | lora, save_quantized and export (refuse while loaded) |
| ``text_encoders`` | a pipeline's transformer | quantize_text_encoders | save_quantized of the transformer alone (warns) |
| ``optimized`` | a pipeline's denoiser | svdquant.optimize | deoptimize, the CLI's report |
| ``stack`` | a FLUX single block | fuse (q/k/v + MLP up projection as one runner) | its stacked forward, unfuse, the layer choice |
| ``processor`` | an attention module | fuse (the processor it had) | unfuse |
| ``act_mlp`` | a FLUX single block | fuse (its GELU moved into proj_out's input, or proj_mlp's epilogue) | unfuse |
| ``modulations`` | a FLUX.1 transformer | fuse(modulations=True): the adaLN stack, its hook, the norms | unfuse |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_KEY = "_svdquant"


@dataclass
class State:
    recipe: dict | None = None
    source: str | None = None
    loras: dict[str, float] = field(default_factory=dict)
    text_encoders: list[str] = field(default_factory=list)
    optimized: Any = None
    stack: Any = None
    processor: Any = None
    act_mlp: Any = None
    modulations: Any = None


def state(obj) -> State:
    """``obj``'s record, made empty on first use."""
    found = obj.__dict__.get(_KEY)
    if found is None:
        found = obj.__dict__[_KEY] = State()
    return found


def peek(obj) -> State:
    """``obj``'s record if it has one, else an empty one that is not attached (reading never writes)."""
    return getattr(obj, "__dict__", {}).get(_KEY) or State()


def take(obj, name: str):
    """Field ``name`` of ``obj``'s record (None if unset), cleared: what undoing a change reads back once."""
    st = peek(obj)
    value = getattr(st, name)
    setattr(st, name, None)
    return value
