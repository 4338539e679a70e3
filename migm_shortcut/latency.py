"""Latency (SPEC section 7): device-synchronised timing of a call, and the protocol that times a
sampler configuration on the sampling itself.

A configuration's samples are drawn batch after batch of the same size; the first
`warmup_batches` are not timed (allocation, autotuning, a compiled forward's compilation) but
their samples are kept, the latency is the median of the other full batches per image, and a last
partial batch is sampled but not timed. The configurations sampled together (the sample stage's
grid) have their timed batches in rounds, one batch of each per round, so a machine whose speed
drifts (a shared VM's does by 10-25% between minutes) slows them alike. On a CPU the sampling
runs under a fixed thread count (`sampling.generate_on_cores`), so a latency is the wall time of
the whole batch on known cores.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .bases.contract import MaskedBase
from .config import SampleConfig, SamplerSetting
from .sampling import feature_source, fixed_threads, generate_on_cores, sampling_autocast
from .schedules import SamplingRule


def measure_latencies(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int, batch_size: int,
    device: str | torch.device,
) -> dict[str, dict[str, float]]:
    """Milliseconds per image of each `fns[name]()`, which processes one batch of `batch_size` images.

    Each call is warmed up `warmup` times (allocation, autotuning, lazy init, compilation), then the
    timed calls run in rounds, one call of each per round, the order rotated from round to round:
    a drift in the machine's speed (another tenant, the clock) then reaches every call alike
    instead of whichever was timed while the machine was slow, and a speedup, a ratio of two of
    them, stays honest. On CUDA the device is synchronised before and after each timed call, so
    queued kernels are neither charged to the next call nor missed. Keys per name:
    median_ms_per_image, p10, p90, std (all ms/image), repeats.
    """
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3 / batch_size)
    return {name: _summary(np.array(t)) for name, t in times.items()}


def measure_latency(
    fn: Callable[[], object], *, warmup: int, repeats: int, batch_size: int, device: str | torch.device
) -> dict[str, float]:
    """`measure_latencies` of one call."""
    return measure_latencies({"": fn}, warmup=warmup, repeats=repeats, batch_size=batch_size, device=device)[""]


def _summary(t: np.ndarray) -> dict[str, float]:
    return {
        "median_ms_per_image": float(np.median(t)),
        "p10": float(np.percentile(t, 10)),
        "p90": float(np.percentile(t, 90)),
        "std": float(t.std(ddof=1)) if len(t) > 1 else 0.0,
        "repeats": len(t),
    }


@dataclass
class TimedSampling:
    """A configuration's samples and how long they took."""

    tokens: torch.Tensor  # [num_samples, L], in sample order, on the CPU
    latency: dict[str, float]  # measure_latency's keys over the timed batches
    batch_size: int
    seconds: float  # wall time of all batches, warm-up and partial batch included
    peak_gpu_memory_mb: float | None  # None off CUDA

    def record(self, decoder_ms: float) -> dict:
        """The latency fields of a sample set's info.json; decoder_ms: decoding, per image."""
        median = self.latency["median_ms_per_image"]
        return {"seconds": self.seconds, "latency_ms": median, "latency_p10_ms": self.latency["p10"],
                "latency_p90_ms": self.latency["p90"], "latency_repeats": self.latency["repeats"],
                "latency_batch_size": self.batch_size, "latency_with_decoder_ms": median + decoder_ms,
                "peak_gpu_memory_mb": self.peak_gpu_memory_mb}


def sample_timed(samplers: dict[str, Callable[[range], torch.Tensor]], *, num_samples: int, batch_size: int,
                 warmup_batches: int, device: torch.device) -> Iterator[tuple[str, TimedSampling]]:
    """Draw `num_samples` samples of each configuration batch by batch (`samplers[name](ids)` ->
    tokens [len(ids), L]), timed by the protocol above, the configurations' timed batches in
    rounds (`measure_latencies`); yields (name, its TimedSampling) as each configuration is done.
    The batches after the timed ones (a paper-scale run's thousands) are drawn one configuration
    at a time, so a killed run keeps the configurations already yielded."""
    repeats = num_samples // batch_size - warmup_batches
    if repeats < 1:
        raise ValueError(f"{num_samples} samples in batches of {batch_size} leave no timed batch after "
                         f"{warmup_batches} warm-up batches")
    cuda = device.type == "cuda"
    spans = [range(first, min(first + batch_size, num_samples)) for first in range(0, num_samples, batch_size)]
    tokens = {name: [] for name in samplers}
    seconds, peak = dict.fromkeys(samplers, 0.0), dict.fromkeys(samplers, 0.0)

    def next_batch(name: str) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        tokens[name].append(samplers[name](spans[len(tokens[name])]).cpu())  # .cpu() waits for the device
        seconds[name] += time.perf_counter() - start
        if cuda:
            peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2**20)

    latency = measure_latencies({name: lambda name=name: next_batch(name) for name in samplers},
                                warmup=warmup_batches, repeats=repeats, batch_size=batch_size, device=device)
    for name in samplers:
        while len(tokens[name]) < len(spans):
            next_batch(name)
        yield name, TimedSampling(torch.cat(tokens.pop(name)), latency[name], batch_size, seconds[name],
                                  peak[name] if cuda else None)


def sample_settings(settings: list[tuple[SamplerSetting, SamplingRule, list[int]]], sample: SampleConfig,
                    base: MaskedBase, shortcut: torch.nn.Module | None, cond: torch.Tensor, device: torch.device,
                    progress: Callable[[int], object] = lambda n: None,
                    ) -> Iterator[tuple[SamplerSetting, TimedSampling]]:
    """All `sample.num_samples` samples of each configuration (setting, its rule, its full steps):
    sample i under condition cond[i], timed by the protocol above (`sample_timed`); yields
    (setting, its TimedSampling) as each is done; `progress(n)` after each batch of n samples."""
    def sampler(setting: SamplerSetting, rule: SamplingRule, refresh: list[int]):
        def sample_batch(ids: range) -> torch.Tensor:
            # A compiled forward is not called from several threads at once: no slicing then.
            out = generate_on_cores(sample.threads, base, rule, cond[ids.start : ids.stop].to(device), list(ids),
                                    sample.seed, slice_batch=not sample.compile, refresh=refresh,
                                    source=lambda: feature_source(setting.sampler, base, shortcut),
                                    autocast_dtype=sampling_autocast(device))
            progress(len(ids))
            return out.tokens
        return sample_batch

    by_name = {setting.name: setting for setting, _, _ in settings}
    samplers = {setting.name: sampler(setting, rule, refresh) for setting, rule, refresh in settings}
    for name, timed in sample_timed(samplers, num_samples=sample.num_samples, batch_size=sample.batch_size,
                                    warmup_batches=sample.warmup_batches, device=device):
        yield by_name[name], timed


def decoder_latency(decode: Callable[[torch.Tensor], object], codes: torch.Tensor, *, threads: int,
                    device: torch.device) -> float:
    """Milliseconds per image of decoding the batch `codes`, under `threads` CPU threads as the sampling."""
    with fixed_threads(threads):
        return measure_latency(lambda: decode(codes), warmup=1, repeats=3, batch_size=len(codes),
                               device=device)["median_ms_per_image"]
