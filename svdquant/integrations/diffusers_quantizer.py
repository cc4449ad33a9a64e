"""The import path README.md shows; the backend lives in :mod:`svdquant.integrations.diffusers`."""
from .diffusers import attach  # noqa: F401
from .diffusers.quantizer import SVDQuantConfig, SVDQuantQuantizer  # noqa: F401
