"""Other projects' checkpoint layouts, and format conversions of quantized models.

* :mod:`.nunchaku` — Nunchaku's single-file INT4 checkpoints of FLUX.1 (and Kontext) and Qwen-Image (and -Edit)
  in (:func:`from_nunchaku`, also what
  :func:`svdquant.load_quantized` does with one: importing this package registers it with the checkpoint loader)
  and out (:func:`to_nunchaku`), on the tensor layouts of :mod:`.nunchaku.packing`; ``svdquant convert nunchaku FILE
  -o DIR`` / ``svdquant convert DIR --to nunchaku -o FILE``;
* :mod:`.two_level` — float-scale W4A4 layers to two-level scales (:func:`to_two_level`), so imported models
  run the INT8 GEMM path; reports the error it adds.
"""

from .nunchaku import from_nunchaku, nunchaku_metadata, to_nunchaku
from .two_level import TwoLevelReport, to_two_level

__all__ = ["from_nunchaku", "to_nunchaku", "nunchaku_metadata", "to_two_level", "TwoLevelReport"]
