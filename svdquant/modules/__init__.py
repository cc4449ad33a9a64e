from .conv import SVDQConv1x1
from .fused import FusedSVDQLinear, fuse, fuse_projections, stacks, unfuse, unfuse_projections
from .linear import SVDQLinear, pending_branches, revision

__all__ = ["SVDQLinear", "SVDQConv1x1", "FusedSVDQLinear", "fuse", "unfuse", "fuse_projections",
           "unfuse_projections", "stacks", "revision", "pending_branches"]
