"""The latency protocol (migm_shortcut/latency.py): which batches are timed, that every sample is
kept in order, and that a configuration samples what the sampler samples, under fixed threads."""

import subprocess
import sys
import time

import pytest
import torch
import yaml
from tiny_models import make_base, make_shortcut, one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut import latency
from migm_shortcut.config import PROFILES_DIR, SamplerSetting, parse_params
from migm_shortcut.samplers import SAMPLERS
from migm_shortcut.sampling import feature_source, generate
from migm_shortcut.schedules import SamplingRule

CPU = torch.device("cpu")


def test_measure_latency_excludes_warmup_and_is_sane():
    calls = []

    def fn():
        calls.append(1)
        torch.ones(64, 64) @ torch.ones(64, 64)

    out = latency.measure_latency(fn, warmup=2, repeats=5, batch_size=8, device="cpu")
    assert len(calls) == 7
    assert out["repeats"] == 5
    assert 0 < out["p10"] <= out["median_ms_per_image"] <= out["p90"] < 1000
    assert out["std"] >= 0


def test_only_full_batches_after_the_warmup_are_timed():
    # 10 samples in batches of 4: [0-3] warm-up, [4-7] timed, [8, 9] sampled but not timed.
    batches = []

    def sample_batch(ids: range) -> torch.Tensor:
        batches.append(ids)
        time.sleep(0.004 if ids == range(4, 8) else 0.2)  # untimed batches are slow
        return torch.tensor(list(ids))[:, None].repeat(1, 3)

    [(name, timed)] = latency.sample_timed({"a": sample_batch}, num_samples=10, batch_size=4, warmup_batches=1,
                                           device=CPU)
    assert name == "a"
    assert batches == [range(0, 4), range(4, 8), range(8, 10)]
    assert torch.equal(timed.tokens[:, 0], torch.arange(10))  # every sample, in order
    assert timed.latency["repeats"] == 1
    assert 1.0 <= timed.latency["median_ms_per_image"] < 20  # ~4 ms / 4 images: the slow batches are out
    assert timed.seconds >= 0.4  # the wall time counts every batch
    record = timed.record(decoder_ms=2.0)
    assert record["latency_with_decoder_ms"] == pytest.approx(record["latency_ms"] + 2.0)
    assert record["latency_batch_size"] == 4 and record["peak_gpu_memory_mb"] is None


def test_configurations_timed_together_see_a_drifting_machine_alike():
    # A machine that slows down by 10 ms per batch: timed one configuration after the other, the
    # first would look 6 batches' drift faster than the last; in rotated rounds, at most two.
    calls = []

    def sampler(name: str):
        def sample_batch(ids: range) -> torch.Tensor:
            calls.append((name, ids.start))
            time.sleep(0.01 * len(calls))
            return torch.full((len(ids), 2), ord(name))
        return sample_batch

    timed = dict(latency.sample_timed({n: sampler(n) for n in "abc"}, num_samples=9, batch_size=2,
                                      warmup_batches=1, device=CPU))
    # warm-ups, three rounds of timed batches (rotated), then each configuration's last sample
    assert calls[:12] == [("a", 0), ("b", 0), ("c", 0), ("a", 2), ("b", 2), ("c", 2),
                          ("b", 4), ("c", 4), ("a", 4), ("c", 6), ("a", 6), ("b", 6)]
    assert calls[12:] == [("a", 8), ("b", 8), ("c", 8)]
    medians = [timed[n].latency["median_ms_per_image"] for n in "abc"]
    assert max(medians) - min(medians) <= 2.5 * 10 / 2  # two batches' drift (10 ms / 2 images), and noise
    for n in "abc":
        assert torch.equal(timed[n].tokens, torch.full((9, 2), ord(n))) and timed[n].latency["repeats"] == 3


def test_no_timed_batch_is_refused():
    with pytest.raises(ValueError, match="no timed batch"):
        next(latency.sample_timed({"a": lambda ids: torch.zeros(len(ids), 1)}, num_samples=7, batch_size=4,
                                  warmup_batches=1, device=CPU))


def test_every_sampler_name_has_its_feature_source():
    base, shortcut = make_base(), make_shortcut()
    assert [feature_source(name, base, shortcut).name for name in SAMPLERS] == list(SAMPLERS)


@pytest.mark.parametrize("sampler", ["shortcut", "extrapolate"])
def test_a_configuration_samples_what_the_sampler_samples(sampler):
    base, shortcut = make_base(), make_shortcut()
    sample = parse_params(yaml.safe_load((PROFILES_DIR / "smoke.yaml").read_text())).sample.model_copy(
        update={"num_samples": 7, "batch_size": 3, "warmup_batches": 1, "threads": 2, "compile": False})
    setting, rule = SamplerSetting(sampler=sampler, steps=6, budget=3), SamplingRule(steps=6, cfg=1.0, tau=4.5)
    cond, seen, refresh = torch.arange(7) % 3, [], [0, 1, 4]  # a placement other than the uniform one
    [(done, out)] = latency.sample_settings([(setting, rule, refresh)], sample, base, shortcut, cond, CPU,
                                            progress=seen.append)
    assert done == setting
    whole = generate(base, rule, cond, list(range(7)), sample.seed, refresh=refresh,
                     source=feature_source(sampler, base, shortcut))
    assert torch.equal(out.tokens, whole.tokens)
    assert seen == [3, 3, 1] and out.latency["repeats"] == 1


def test_decoding_is_timed_on_the_sampling_threads():
    threads = []
    ms = latency.decoder_latency(lambda codes: threads.append(torch.get_num_threads()), torch.zeros(4, 2),
                                 threads=2, device=CPU)
    assert ms >= 0 and threads == [2] * 4  # one warm-up call, three timed


FAULTS_SCRIPT = """
import ctypes, resource, sys
import torch
from migm_shortcut.hardware import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
from migm_shortcut.shortcut import Shortcut, ShortcutSpec
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit("not glibc")
if sys.argv[1] == "returned":  # glibc's starting thresholds, held: they move with the heap's history
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt(M_MMAP_THRESHOLD, 128 << 10), mallopt(M_TRIM_THRESHOLD, 128 << 10)
torch.set_num_threads(1)
shortcut = Shortcut(ShortcutSpec(dim=128, bottleneck_ratio=4, heads=1))  # the default's sizes
f, new = torch.randn(124, 50, 128), torch.randn(124, 3, 128)
positions, ratio = torch.randint(0, 49, (124, 3)), torch.full((124,), 0.5)
with torch.inference_mode():
    for _ in range(3):  # warm-up: the heap grows to its size
        shortcut(f, new, None, ratio, new_positions=positions)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        shortcut(f, new, None, ratio, new_positions=positions)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    """A shortcut step at the default's sizes (batch 62, both branches) allocates dozens of 1-3 MB
    activations. Returned to the system, they come back with a page fault per 4 KB page (about
    170,000 in 20 steps; glibc's moving default, 28,000); kept, a few hundred at most (torch's lazy
    set-up, a test worker beside it)."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], check=True, text=True,
                                       capture_output=True).stdout) for mode in ("returned", "keep")}
    assert faults["returned"] > 50_000 and faults["keep"] < 5_000, faults
