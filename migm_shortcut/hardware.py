"""What a latency was measured on: rows timed on different machines do not compare."""

from pathlib import Path

import torch

IDENTITY = ("hardware", "threads", "torch")  # the fields two comparable latencies share


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
