"""The latency benchmark runs on a profile's sizes and prints the ratios BENCHMARKS.md quotes."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_latency_benchmark_prints_step_ratio_speedups_and_the_gain_of_slicing():
    cmd = [sys.executable, "benchmarks/latency.py", "--random", "--profile", "smoke", "--steps", "8", "--budgets", "2", "4",
           "--repeats", "2", "--threads", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "batch 10," in out  # the profile's sample.batch_size
    assert re.search(r"shortcut [\d.]+ ms/img, ratio [\d.]+", out)
    assert len(re.findall(r"shortcut N=8 B=\d: [\d.]+ ms/img, speedup [\d.]+x \(limit N/B", out)) == 2
    assert re.search(r"whole batch on 2 intra-op threads instead of a slice per thread: [\d.]+ ms/img \([\d.]+x", out)


def test_latency_benchmark_refuses_a_text_to_image_profile():
    cmd = [sys.executable, "benchmarks/latency.py", "--profile", "paper-dimoo"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "conditions on classes" in run.stderr
