import os
import tempfile

import torch

# Without a GPU, Triton kernels run in its interpreter (on CPU tensors). Must be set before
# any kernel module is imported: @triton.jit reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

# Under `pytest -n N` (pytest-xdist, the README's command) each worker is one of N processes sharing the cores:
# torch's own thread pool per worker would oversubscribe them (2 workers x 2 threads on 2 cores: 9 min 57 s for
# the suite; one thread each: 7 min 34 s). A user's OMP_NUM_THREADS wins; commands the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


# The parts of the suite that need something optional, as (name, word in the skip reason, how to get it): a run
# that skipped them says so at the end, one line each, instead of a bare "s" among the dots.
OPTIONAL_PARTS = (
    ("ray", "ray", "pip install 'ray[serve]'"),
    ("chromium", "chromium", "apt-get install chromium (Debian's; .ci/run installs it) and pip install playwright"),
    ("playwright", "playwright", "pip install playwright"),
    ("triton", "triton", "pip install -e '.[dev]'"),
    ("GPU", "cuda gpu", None),
)


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter):
    groups: dict[str, list[str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = _skip_reason(report)
        part = next((p for p in OPTIONAL_PARTS if p[1] in reason.lower()), None)
        groups.setdefault(part[0] if part else reason, []).append(reason)
    fixes = {name: fix for name, _, fix in OPTIONAL_PARTS}
    for name, reasons in groups.items():
        n = f"{len(reasons)} test{'s' if len(reasons) > 1 else ''}"
        if name in fixes:
            fix = f"; to run: {fixes[name]}" if fixes[name] else ""
            terminalreporter.write_line(f"skipped {name} ({n}): {reasons[0]}{fix}")
        else:
            terminalreporter.write_line(f"skipped ({n}): {name}")
