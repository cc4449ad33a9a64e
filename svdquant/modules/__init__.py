from .conv import SVDQConv1x1
from .linear import SVDQLinear

__all__ = ["SVDQLinear", "SVDQConv1x1"]
