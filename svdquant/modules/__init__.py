from .conv import SVDQConv1x1
from .fused import FusedSVDQLinear, fuse_projections, unfuse_projections
from .linear import SVDQLinear

__all__ = ["SVDQLinear", "SVDQConv1x1", "FusedSVDQLinear", "fuse_projections", "unfuse_projections"]
