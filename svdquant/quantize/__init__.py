"""``svdquant.quantize``: the one entry point that turns a 16-bit model into an SVDQuant one.

    import svdquant
    report = svdquant.quantize(pipe, "int4")              # a diffusers pipeline, default prompts
    report = svdquant.quantize(pipe.transformer, "int4",  # a bare model + its forward inputs
                               calibration=svdquant.Calibration(inputs=[kwargs, ...]))
    print(report)

Block by block: the pipeline runs once over the calibration prompts while hooks keep
the inputs of the first block of each stack on the drawn (prompt, step) calls; then
each block is replayed in 16 bits on those inputs, with hooks keeping what its linears
read, its linears are quantized and swapped in place, and the block's 16-bit outputs
become the next block's inputs. Only one block's layer inputs are held at once, and
every layer is calibrated on 16-bit inputs.

Where things live:

* ``api.py``: :func:`quantize` and :func:`quantize_text_encoders`;
* ``plan.py``: every argument checked before calibration starts, into one :class:`QuantPlan`;
* ``blocks.py``: the quantize phase, block by block and group by group (the one place a group's layers are
  built);
* ``report.py``: :class:`QuantReport`, :class:`LayerRow`, the progress bar's text.

Below this floor: which calibration calls run and how far, the block replays and the memory policy while a
model streams from the CPU are in :mod:`svdquant.calibration` (``schedule``, ``replay``, ``memory``); which
text encoder layers are quantized, and how, in :mod:`svdquant.models.text_encoders`.
"""

from .api import quantize, quantize_text_encoders
from .plan import QuantPlan
from .report import LayerRow, QuantReport, progress_postfix

__all__ = ["LayerRow", "QuantPlan", "QuantReport", "progress_postfix", "quantize", "quantize_text_encoders"]
