"""The evaluation report: speedups, the matched-latency comparison, a markdown table, the Pareto plot.

Pure functions over one row per sampler configuration (its info.json merged with its metrics). The
quality axis is FID (lower is better) for image datasets and CLIPScore (higher is better) for
text-to-image prompts; a row holds it under `quality.key`, with `<key>_ci_low/_ci_high` when known.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .samplers import EXTRAPOLATE, REUSE, SHORTCUT, VANILLA


@dataclass(frozen=True)
class Quality:
    key: str  # the row's field
    label: str
    higher_is_better: bool

    def gain(self, value: float, than: float) -> float:
        """How much better `value` is than `than` (positive: better)."""
        return value - than if self.higher_is_better else than - value


FID = Quality("fid", "FID", higher_is_better=False)
CLIP_SCORE = Quality("clip_score", "CLIPScore", higher_is_better=True)

SAMPLER_STYLE = {VANILLA: ("tab:blue", "o"), SHORTCUT: ("tab:red", "s"), REUSE: ("tab:gray", "^"),
                 EXTRAPOLATE: ("tab:green", "v"), f"{SHORTCUT}-learned": ("tab:purple", "D")}  # fmt: skip


def method(r: dict) -> str:
    """The row's sampler, told apart by its refresh placement when that is learned."""
    return f"{r['sampler']}-learned" if r.get("placement") == "learned" else r["sampler"]


def configuration(r: dict) -> str:
    """N and B, and a learned placement's refresh steps."""
    text = f"{r['steps']} steps" + ("" if r["sampler"] == VANILLA else f", B={r['budget']}")
    return text + (f", refreshes {r['refresh_steps']}" if r.get("placement") == "learned" else "")


def add_comparisons(rows: list[dict], reference_steps: int, quality: Quality = FID) -> list[dict]:
    """Speedups (vs vanilla at the same N, vs the reference vanilla N) and, for accelerated samplers,
    vanilla's quality interpolated at the same latency ("matched latency")."""
    q = quality.key
    vanilla = sorted((r for r in rows if r["sampler"] == VANILLA), key=lambda r: r["latency_ms"])
    by_steps = {r["steps"]: r for r in vanilla}
    reference = by_steps[reference_steps]
    lat = np.array([r["latency_ms"] for r in vanilla])
    for r in rows:
        r["speedup_vs_reference"] = reference["latency_ms"] / r["latency_ms"]
        same = by_steps.get(r["steps"])
        r["speedup_vs_same_steps"] = same["latency_ms"] / r["latency_ms"] if same else None
        r["speedup_limit"] = r["steps"] / r["budget"]
        r[f"matched_vanilla_{q}"] = None
        r[f"{q}_gain_at_matched_latency"] = None
        r["beats_vanilla_beyond_uncertainty"] = None
        if r["sampler"] != VANILLA and len(vanilla) > 1 and lat[0] <= r["latency_ms"] <= lat[-1]:
            keys = [k for k in (q, f"{q}_ci_low", f"{q}_ci_high") if k in r]
            interp = {k: float(np.interp(r["latency_ms"], lat, [v[k] for v in vanilla])) for k in keys}
            r[f"matched_vanilla_{q}"] = interp[q]
            r[f"{q}_gain_at_matched_latency"] = quality.gain(r[q], interp[q])
            if f"{q}_ci_low" in r:  # the whole interval beyond vanilla's interval
                worst, best = (f"{q}_ci_low", f"{q}_ci_high") if quality.higher_is_better else (f"{q}_ci_high", f"{q}_ci_low")
                r["beats_vanilla_beyond_uncertainty"] = quality.gain(r[worst], interp[best]) > 0
    return rows


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _paired(r: dict, name: str, against: str = "") -> str:
    """A paired difference with its interval, bold when beyond it: `name` is its row key."""
    if name not in r:
        return "–"
    mark = " **better**" if r[f"{name}_beyond_ci"] else ""
    return f"{r[name]:+.2f} ({r[name + '_ci_low']:+.2f} to {r[name + '_ci_high']:+.2f}){against}{mark}"


def _interval(r: dict, key: str) -> str:
    if key not in r:
        return "–"
    ci = f" ({r[key + '_ci_low']:.2f}–{r[key + '_ci_high']:.2f})" if key + "_ci_low" in r else ""
    return f"{r[key]:.2f}{ci}"


def markdown_table(rows: list[dict], reference_steps: int, quality: Quality = FID, note: str = "") -> str:
    """The report's table, with the columns the rows can fill (FID against dataset statistics, the
    domain FID, KID, class accuracy and the paired baseline comparisons only where a profile
    computes them); `note` ends the caption."""
    q, label = quality.key, quality.label
    columns = {  # header -> cell of row r
        "Method": method,
        "Configuration": configuration,
        "Latency (ms/img)": lambda r: f"{r['latency_ms']:.2f}",
        f"Speedup vs N={reference_steps}": lambda r: f"{r['speedup_vs_reference']:.2f}x",
        "Speedup vs same N": lambda r: _fmt(r["speedup_vs_same_steps"], ".2f") + ("x" if r["speedup_vs_same_steps"] else ""),
        f"{label} (95% CI)": lambda r: _interval(r, q),
        f"{label} minus the next slower vanilla (paired 95% CI)":
            lambda r: _paired(r, f"{q}_minus_slower_vanilla", f" vs {r.get('faster_than')}"),
        f"{label} minus reuse (paired)": lambda r: _paired(r, f"{q}_minus_reuse"),
        f"{label} minus extrapolate (paired)": lambda r: _paired(r, f"{q}_minus_extrapolate"),
        f"{label} learned minus uniform placement (paired)": lambda r: _paired(r, f"{q}_minus_uniform"),
        f"Vanilla {label} at same latency": lambda r: _fmt(r[f"matched_vanilla_{q}"], ".2f"),
        "FID vs dataset stats": lambda r: _fmt(r.get("fid_dataset_stats"), ".2f"),
        "Domain FID (95% CI)": lambda r: _interval(r, "domain_fid"),
        "Domain FID minus reuse (paired)": lambda r: _paired(r, "domain_fid_minus_reuse"),
        "KID": lambda r: _fmt(r.get("kid_mean"), ".3g"),
        "Class acc. (worst class)": lambda r: f"{r['class_accuracy']:.1%} ({r['worst_class_accuracy']:.0%})",
    }
    needs = {"FID vs dataset stats": "fid_dataset_stats", "KID": "kid_mean", "Class acc. (worst class)": "class_accuracy",
             "Domain FID (95% CI)": "domain_fid", "Domain FID minus reuse (paired)": "domain_fid_minus_reuse",
             f"{label} minus reuse (paired)": f"{q}_minus_reuse",
             f"{label} minus extrapolate (paired)": f"{q}_minus_extrapolate",
             f"{label} learned minus uniform placement (paired)": f"{q}_minus_uniform"}
    columns = {h: cell for h, cell in columns.items() if h not in needs or any(needs[h] in r for r in rows)}
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in sorted(rows, key=lambda r: (r["sampler"] != VANILLA, method(r), r["steps"], r["budget"])):
        lines.append("| " + " | ".join(cell(r) for cell in columns.values()) + " |")
    n = rows[0]["num_samples"]
    scored = sorted({r.get(f"{q}_samples", n) for r in rows} - {n})
    of = f", {label} on the first {'/'.join(map(str, scored))}" if scored else ""
    return "\n".join(lines) + f"\n\n{n} samples per configuration{of}; {note}\n"


def pareto_plot(rows: list[dict], path: Path, title: str, quality: Quality = FID) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = quality.key
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((method(r), 0 if r["sampler"] == VANILLA else r["steps"]), []).append(r)
    for (sampler, steps), group in sorted(groups.items()):
        group.sort(key=lambda r: r["latency_ms"])
        color, marker = SAMPLER_STYLE[sampler]
        label = "Vanilla" if sampler == VANILLA else f"{sampler.capitalize()} (N={steps})"
        x, y = [r["latency_ms"] for r in group], [r[q] for r in group]
        # One colour per sampler; its curves at different N differ by line style.
        style = ["-", "--", ":", "-."][sorted(n for k, n in groups if k == sampler).index(steps) % 4]
        ax.plot(x, y, marker=marker, color=color, label=label, linestyle=style)
        if f"{q}_ci_low" in group[0]:
            ax.errorbar(x, y, yerr=[[r[q] - r[f"{q}_ci_low"] for r in group], [r[f"{q}_ci_high"] - r[q] for r in group]],
                        fmt="none", ecolor=color, alpha=0.4, capsize=2)
        for r in group:
            ax.annotate(f"{r['steps']}" if sampler == VANILLA else f"B={r['budget']}", (r["latency_ms"], r[q]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xlabel("latency (ms per image)")
    ax.set_ylabel(f"{quality.label} ({'higher' if quality.higher_is_better else 'lower'} is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
