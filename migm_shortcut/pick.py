"""The budget picker: which measured configuration answers a user's speed or quality question.

Pure functions over the evaluated rows (one per sampler configuration, as `evaluate` writes them
to data/report/metrics.json, with `latency_ms`, `speedup_vs_reference` and the quality key). Two
questions, both answered only from measured configurations (nothing is interpolated):

- the fastest configuration whose quality is at most a given loss worse than the reference
  (vanilla at sampling.steps), the loss relative ("5%") or absolute ("2.0");
- the best quality among the configurations at least a given factor faster than the reference.
"""

from pathlib import Path

from .config import SamplerSetting, parse_params, with_config
from .report import CLIP_SCORE, FID, Quality
from .samplers import SHORTCUT, VANILLA


class PickError(ValueError):
    """A budget question that is malformed, or that no measured configuration answers (the message
    then says what the closest one reached)."""


def parse_loss(text: str) -> tuple[float, bool]:
    """"5%" -> (0.05, relative); "2.0" -> (2.0, absolute): a quality loss a user accepts."""
    relative = text.strip().endswith("%")
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise PickError(f"--max-loss {text!r}: expected a number (absolute) or a percentage like 5%") from None
    if value < 0:
        raise PickError(f"--max-loss {text!r}: a loss cannot be negative")
    return (value / 100, True) if relative else (value, False)


def evaluated_rows(metrics: dict) -> list[dict]:
    """The per-configuration rows of data/report/metrics.json (its other entries are summaries)."""
    return [r for r in metrics.values() if isinstance(r, dict) and "sampler" in r]


def rows_quality(rows: list[dict]) -> Quality:
    """The quality the rows were scored on: CLIPScore for text to image, else FID."""
    return CLIP_SCORE if all(CLIP_SCORE.key in r for r in rows) else FID


def reference_row(rows: list[dict], reference_steps: int) -> dict:
    for r in rows:
        if r["sampler"] == VANILLA and r["steps"] == reference_steps:
            return r
    raise PickError(f"the evaluated grid has no vanilla-N{reference_steps}, the reference (sampling.steps)")


def loss(row: dict, reference: dict, quality: Quality) -> float:
    """How much worse `row` is than the reference (negative: better)."""
    return -quality.gain(row[quality.key], reference[quality.key])


def fastest_within_loss(rows: list[dict], reference_steps: int, quality: Quality, max_loss: float,
                        relative: bool) -> dict:
    """The lowest-latency row faster than the reference and at most `max_loss` (a fraction of the
    reference's value if `relative`) worse; raises PickError, naming the closest, when none is."""
    ref = reference_row(rows, reference_steps)
    allowed = max_loss * abs(ref[quality.key]) if relative else max_loss
    faster = [r for r in rows if r["speedup_vs_reference"] > 1]
    if not (within := [r for r in faster if loss(r, ref, quality) <= allowed]):
        closest = min(faster, key=lambda r: loss(r, ref, quality), default=None)
        reached = f"; the closest, {closest['name']}, loses {loss(closest, ref, quality):.2f}" if closest else ""
        raise PickError(f"no measured configuration faster than {ref['name']} loses at most {allowed:.2f} "
                        f"{quality.label}{reached}")
    return min(within, key=lambda r: r["latency_ms"])


def best_at_speedup(rows: list[dict], quality: Quality, min_speedup: float) -> dict:
    """The best-quality row at least `min_speedup` times faster than the reference (the faster one
    on a tie); raises PickError, naming the fastest measured speedup, when none is."""
    fast = [r for r in rows if r["speedup_vs_reference"] >= min_speedup]
    if not fast:
        top = max(rows, key=lambda r: r["speedup_vs_reference"])
        raise PickError(f"no measured configuration reaches {min_speedup:g}x; the fastest is {top['name']} at "
                       f"{top['speedup_vs_reference']:.2f}x")
    return max(fast, key=lambda r: (quality.gain(r[quality.key], 0.0), -r["latency_ms"]))


def describe(row: dict, reference: dict, quality: Quality) -> str:
    """One line a user reads: the choice, its latency and speedup, its quality and interval."""
    q = quality.key
    interval = f" (95% CI {row[q + '_ci_low']:.2f}-{row[q + '_ci_high']:.2f})" if q + "_ci_low" in row else ""
    return (f"{row['name']}: {row['latency_ms']:.2f} ms/image ({row['speedup_vs_reference']:.2f}x vs "
            f"{reference['name']}), {quality.label} {row[q]:.2f}{interval}; reference {quality.label} {reference[q]:.2f}")


def narrowed_grid(row: dict, reference_steps: int) -> dict:
    """The `sample` keys that make a later run sample just the choice and the reference vanilla
    (which every speedup is measured against), e.g. to confirm it on more samples."""
    setting = SamplerSetting(sampler=row["sampler"], steps=row["steps"], budget=row["budget"],
                             placement=row.get("placement", "uniform"))
    if setting.sampler == VANILLA:
        return {"vanilla_steps": sorted({reference_steps, setting.steps}), "shortcut": [], "baselines": [],
                "baseline_steps": []}
    baselines = [] if setting.sampler == SHORTCUT else [setting.sampler]
    return {"vanilla_steps": [reference_steps], "shortcut": [{"steps": setting.steps, "budgets": [setting.budget],
                                                              "placement": setting.placement}],
            "baselines": baselines, "baseline_steps": [setting.steps] if baselines else []}


def write_choice(params_file: Path, row: dict, reference_steps: int) -> None:
    """Narrow params_file's sample grid to the choice, keeping its comments; the result is validated
    before it is written, so a params file that would not load is never left behind."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load(Path(params_file).read_text())
    doc["sample"].update(narrowed_grid(row, reference_steps))
    parse_params(with_config(dict(doc), params_file), str(params_file))
    with Path(params_file).open("w") as f:
        yaml.dump(doc, f)
