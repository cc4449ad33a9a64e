"""Calibration: run the 16-bit model on prompts and capture what each quantized layer reads.

Where things live:

* ``config.py``: what to run (:class:`Calibration`), and what a calibration asks of a pipeline, checked first;
* ``prompts.py``: the 128 built-in prompts;
* ``draw.py``: which (prompt, step) pairs are drawn, and the pipeline calls that run them (prompts drawn at the
  same steps together);
* ``capture.py``: the hooks (which calls are snapshots, each stack's first-block arguments, the linears' inputs);
* ``chain.py``: the check that a model chains its blocks as the replays do (then only the first stack's inputs
  are recorded, and the forwards stop at the first block);
* ``schedule.py``: which calibration calls run and how far (:func:`calibrate_stacks`);
* ``replay.py``: the blocks replayed in 16 bits on the snapshots, on a side CUDA stream on a GPU;
* ``merge.py``: one-image recorded calls joined into calls of a few images for the replays (on a GPU);
* ``offload.py``: a CPU-held model streamed through a GPU one piece at a time;
* ``ahead.py``: a streamed pipeline's text encoders run once ahead of the calibration calls, which reuse their outputs;
* ``memory.py``: what stays on the device while it streams (resident blocks, snapshots, the cap).
"""

from .capture import EntryRecorder, LinearInputRecorder, record_inputs, run_calibration, to_device
from .config import Calibration, check_pipeline_call
from .draw import calibration_batches, draw_plan
from .memory import gpu_cap, gpu_memory, memory_cap, resident_blocks, snapshots_fit, stream_model
from .offload import Streamed, finish_block, move
from .prompts import DEFAULT_PROMPTS
from .replay import ReplayJob, Replayer, replay_jobs
from .schedule import Calibrated, calibrate_stacks

__all__ = ["Calibrated", "Calibration", "DEFAULT_PROMPTS", "EntryRecorder", "LinearInputRecorder", "ReplayJob",
           "Replayer", "Streamed", "calibrate_stacks", "calibration_batches", "check_pipeline_call", "draw_plan",
           "finish_block", "gpu_cap", "gpu_memory", "memory_cap", "move", "record_inputs", "replay_jobs",
           "resident_blocks", "run_calibration", "snapshots_fit", "stream_model", "to_device"]
