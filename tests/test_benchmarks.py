"""The latency benchmark runs on a profile's sizes and prints the ratios BENCHMARKS.md quotes."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/latency.py", *args], cwd=ROOT, capture_output=True, text=True,
                          check=check)


def test_latency_benchmark_prints_step_costs_implied_and_measured_speedups():
    out = run("--random", "--profile", "smoke", "--steps", "8", "--budgets", "2", "4", "--repeats", "2",
              "--threads", "2").stdout
    assert "batch 10 " in out and "batch 10," in out  # the profile's sample.batch_size, in both parts
    # part 1: the three costs as shares of a base step, at every N of the profile's grid (8 and 12)
    costs = re.findall(r"N = (\d+): base step [\d.]+ ms/img; shortcut step [\d.]+ ms/img on average over steps 1 "
                       r"to N - 1 \([\d.]+% of a base step; [\d.]+% at its largest\); "
                       r"sampler's own work [\d.]+ ms/img per step on average \([\d.]+%", out)
    assert costs == ["8", "12"]
    assert len(re.findall(r"N\d+ B\d+: implied speedup [\d.]+x of N/B [\d.]+x = \d+%", out)) == 3
    # part 2: end to end, shortcut and reuse at both budgets, and the gain of slicing
    for source in ("shortcut", "reuse"):
        assert len(re.findall(rf"{source} N=8 B=\d: [\d.]+ ms/img, speedup [\d.]+x \(limit N/B", out)) == 2
    assert re.search(r"whole batch on 2 intra-op threads instead of a slice per thread: [\d.]+ ms/img \([\d.]+x", out)


def test_latency_benchmark_times_a_published_architecture_with_random_weights():
    out = run("--random", "--profile", "paper-maskgit-256", "--layers", "1", "--batch", "1", "--repeats", "1").stdout
    assert "1 of 24 layers, scaled" in out and "L = 256, K = 1024, D = 768" in out
    # the paper's points with its own figures beside them
    assert re.search(r"N15 B7: implied speedup [\d.]+x of N/B 2.14x = \d+%; paper 1.93x, 90%", out)
    assert "part 2" not in out  # end to end is for the trained tiny base


def test_latency_benchmark_refuses_a_published_profile_without_random():
    refused = run("--profile", "paper-dimoo", check=False)
    assert refused.returncode == 2 and "timed with --random" in refused.stderr
