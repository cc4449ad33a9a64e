import os

import torch

# Without a GPU, Triton kernels run in its interpreter (on CPU tensors). Must be set before
# any kernel module is imported: @triton.jit reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Quantize on one CPU thread: with the 2 cores shared with other processes, torch's 2-thread OpenMP
    regions spin at their barriers (the demo's quantization went from ~15 s to 90-240 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
