import os
import tempfile

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


@pytest.fixture(scope="session", autouse=True)
def temp_files_in_pytests_folder(tmp_path_factory):
    """What the tests, the library and the commands they start write to the system temp folder (tempfile,
    TMPDIR) goes into pytest's own folder instead, which a passing run removes (pyproject.toml's
    tmp_path_retention_policy): the suite leaves nothing in /tmp."""
    folder = tmp_path_factory.mktemp("system-tmp", numbered=False)
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(folder)
    yield folder
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]

