"""The quantization algorithm, one linear (or one group of linears sharing an input) at a time."""

from .layer import LayerReport, QuantizedWeights, candidate_smoothing, quantize_linear, quantize_linears
from .weight_only import quantize_weight_only
from .lowrank import low_rank

__all__ = ["LayerReport", "QuantizedWeights", "candidate_smoothing", "quantize_linear", "quantize_linears",
           "quantize_weight_only", "low_rank"]
