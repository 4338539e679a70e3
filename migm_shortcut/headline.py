"""The headline figures of an evaluated grid: a few flat numbers for `dvc metrics diff` and `dvc exp
show` (the full per-configuration table stays in data/report/metrics.json), and the rows of the
quality-latency plot with one `quality` field whatever the profile scores (FID or CLIPScore)."""

from .hardware import check_same_hardware
from .pick import PickError, best_at_speedup, fastest_within_loss, reference_row
from .report import Quality
from .samplers import SHORTCUT

MAX_LOSS = 0.05  # "the fastest configuration within 5% of the reference's quality"
MIN_SPEEDUP = 2.0  # "the best quality at 2x or faster"


def headline(rows: list[dict], reference_steps: int, quality: Quality,
             shortcut_val_mse_ratio: float) -> dict[str, float]:
    """At most about 20 numbers; a question no measured configuration answers is left out. Rows
    timed on different hardware raise ValueError: their speedups would mean nothing.
    `shortcut_val_mse_ratio`: the shortcut's validation MSE over reuse's, mean over the steps."""
    check_same_hardware(rows)
    q, ref = quality.key, reference_row(rows, reference_steps)
    shortcut = [r for r in rows if r["sampler"] == SHORTCUT]
    out = {f"reference_{q}": ref[q], "reference_latency_ms": ref["latency_ms"],
           "shortcut_val_mse_ratio": shortcut_val_mse_ratio,
           "max_shortcut_speedup": max((r["speedup_vs_reference"] for r in shortcut), default=0.0),
           "dominating_configurations": sum(bool(r.get("dominates_slower_vanilla")) for r in rows)}
    try:
        fast = fastest_within_loss(rows, reference_steps, quality, MAX_LOSS, relative=True)
        out |= {"speedup_within_5pct_loss": fast["speedup_vs_reference"], f"{q}_within_5pct_loss": fast[q]}
    except PickError:
        pass
    try:
        out[f"best_{q}_at_2x"] = best_at_speedup(rows, quality, MIN_SPEEDUP)[q]
    except PickError:
        pass
    for r in shortcut:  # the paired comparison with the training-free cache, where evaluated
        if f"{q}_minus_reuse" in r:
            out[f"{r['name']}_{q}_minus_reuse"] = r[f"{q}_minus_reuse"]
    return out


def plot_rows(rows: list[dict], quality: Quality) -> list[dict]:
    """One point per configuration for the DVC scatter: latency against `quality` (and its interval)."""
    q = quality.key
    return [{"name": r["name"], "sampler": r["sampler"], "steps": r["steps"], "budget": r["budget"],
             "latency_ms": r["latency_ms"], "quality": r[q],
             **{f"quality_ci_{end}": r[f"{q}_ci_{end}"] for end in ("low", "high") if f"{q}_ci_{end}" in r}}
            for r in rows]
