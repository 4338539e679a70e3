"""What a latency was measured on (rows timed on different machines do not compare), and the
process setting that every stage's CPU work runs under (`keep_freed_memory`)."""

import ctypes
import ctypes.util
from pathlib import Path

import torch

IDENTITY = ("hardware", "threads", "torch")  # the fields two comparable latencies share
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the process's next allocations instead of returning it.

    By default glibc gives each block above a moving threshold (128 KB up to 32 MB) its own mmap,
    and returns a free heap top above twice that threshold to the system: the next tensor of that
    size starts with a page fault per 4 KB page. A shortcut step allocates dozens of 1-3 MB
    activations, and on the project's VMs those faults doubled its time (BENCHMARKS.md,
    section 1). Blocks up to 32 MB now come from the heap, and up to 1 GB of free heap is kept.
    Returns whether the C library took both settings (False where it is not glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) & bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown CPU"


def hardware_identity(device: torch.device, threads: int) -> dict:
    """The fields IDENTITY names, for a latency measured on `device` with `threads` CPU threads."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"hardware": name, "threads": threads, "torch": torch.__version__}


def check_same_hardware(rows: list[dict]) -> None:
    """Raise ValueError naming two rows whose latencies were measured on different hardware (or
    threads, or torch); rows that predate these fields are taken as they are."""
    first: dict[str, tuple[str, object]] = {}
    for r in rows:
        for key in IDENTITY:
            if key not in r:
                continue
            name, value = first.setdefault(key, (r["name"], r[key]))
            if r[key] != value:
                raise ValueError(f"latencies do not compare: {name} was timed with {key}={value!r}, {r['name']} with "
                                 f"{key}={r[key]!r}; resample one machine's sets (`dvc repro sample`)")
