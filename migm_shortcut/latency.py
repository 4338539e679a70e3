"""Latency (SPEC section 7): device-synchronised timing of a call, and the protocol that times a
sampler configuration on the sampling itself.

A configuration's samples are drawn batch after batch of the same size; the first
`warmup_batches` are not timed (allocation, autotuning, a compiled forward's compilation) but
their samples are kept, the latency is the median of the other full batches per image, and a last
partial batch is sampled but not timed. On a CPU the sampling runs under a fixed thread count
(`sampling.generate_on_cores`), so a latency is the wall time of the whole batch on known cores.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .bases.contract import MaskedBase
from .config import SampleConfig, SamplerSetting
from .sampling import feature_source, fixed_threads, generate_on_cores, sampling_autocast
from .schedules import SamplingRule


def measure_latency(
    fn: Callable[[], object], *, warmup: int, repeats: int, batch_size: int, device: str | torch.device
) -> dict[str, float]:
    """Milliseconds per image of `fn()`, which processes one batch of `batch_size` images.

    `warmup` calls are run and discarded (allocation, autotuning, lazy init). On CUDA the device
    is synchronised before and after each timed call, so queued kernels are neither charged to
    the next call nor missed. Keys: median_ms_per_image, p10, p90, std (all ms/image), repeats.
    """
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3 / batch_size)
    t = np.array(times)
    return {
        "median_ms_per_image": float(np.median(t)),
        "p10": float(np.percentile(t, 10)),
        "p90": float(np.percentile(t, 90)),
        "std": float(t.std(ddof=1)) if repeats > 1 else 0.0,
        "repeats": repeats,
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


def sample_timed(sample_batch: Callable[[range], torch.Tensor], *, num_samples: int, batch_size: int,
                 warmup_batches: int, device: torch.device) -> TimedSampling:
    """Draw `num_samples` samples batch by batch (`sample_batch(ids)` -> tokens [len(ids), L]) and
    time the batches by the protocol above."""
    repeats = num_samples // batch_size - warmup_batches
    if repeats < 1:
        raise ValueError(f"{num_samples} samples in batches of {batch_size} leave no timed batch after "
                         f"{warmup_batches} warm-up batches")
    batches = iter(range(first, min(first + batch_size, num_samples)) for first in range(0, num_samples, batch_size))
    tokens = []

    def next_batch() -> None:
        tokens.append(sample_batch(next(batches)).cpu())

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    latency = measure_latency(next_batch, warmup=warmup_batches, repeats=repeats, batch_size=batch_size, device=device)
    if num_samples % batch_size:
        next_batch()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return TimedSampling(torch.cat(tokens), latency, batch_size, seconds, peak)


def sample_setting(setting: SamplerSetting, rule: SamplingRule, sample: SampleConfig, base: MaskedBase,
                   shortcut: torch.nn.Module | None, cond: torch.Tensor, refresh: list[int], device: torch.device,
                   progress: Callable[[int], object] = lambda n: None) -> TimedSampling:
    """All `sample.num_samples` samples of one configuration (sample i under condition cond[i]) with
    the base at the full steps `refresh`, timed by the protocol above; `progress(n)` after each
    batch of n samples."""
    def sample_batch(ids: range) -> torch.Tensor:
        # A compiled forward is not called from several threads at once: no slicing then.
        out = generate_on_cores(sample.threads, base, rule, cond[ids.start : ids.stop].to(device), list(ids),
                                sample.seed, slice_batch=not sample.compile, refresh=refresh,
                                source=lambda: feature_source(setting.sampler, base, shortcut),
                                autocast_dtype=sampling_autocast(device))
        progress(len(ids))
        return out.tokens

    return sample_timed(sample_batch, num_samples=sample.num_samples, batch_size=sample.batch_size,
                        warmup_batches=sample.warmup_batches, device=device)


def decoder_latency(decode: Callable[[torch.Tensor], object], codes: torch.Tensor, *, threads: int,
                    device: torch.device) -> float:
    """Milliseconds per image of decoding the batch `codes`, under `threads` CPU threads as the sampling."""
    with fixed_threads(threads):
        return measure_latency(lambda: decode(codes), warmup=1, repeats=3, batch_size=len(codes),
                               device=device)["median_ms_per_image"]
