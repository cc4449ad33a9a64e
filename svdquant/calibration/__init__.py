"""Calibration: run the 16-bit model on prompts and capture what each quantized layer reads."""

from .capture import (
    Calibration, EntryRecorder, LinearInputRecorder, draw_plan, record_inputs, run_calibration, to_device,
)
from .prompts import DEFAULT_PROMPTS

__all__ = ["Calibration", "DEFAULT_PROMPTS", "EntryRecorder", "LinearInputRecorder", "draw_plan",
           "record_inputs", "run_calibration", "to_device"]
