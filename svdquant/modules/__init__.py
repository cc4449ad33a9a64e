from .linear import SVDQLinear

__all__ = ["SVDQLinear"]
