"""The evaluation report: speedups, the matched-latency comparison, a markdown table, the Pareto plot.

Pure functions over one row per sampler configuration (its info.json merged with its metrics).
"""

from pathlib import Path

import numpy as np

SAMPLER_STYLE = {"vanilla": ("tab:blue", "o"), "shortcut": ("tab:red", "s"), "reuse": ("tab:gray", "^"),
                 "extrapolate": ("tab:green", "v")}  # fmt: skip


def add_comparisons(rows: list[dict], reference_steps: int) -> list[dict]:
    """Speedups (vs vanilla at the same N, vs the reference vanilla N) and, for accelerated samplers,
    vanilla's FID interpolated at the same latency ("matched latency")."""
    vanilla = sorted((r for r in rows if r["sampler"] == "vanilla"), key=lambda r: r["latency_ms"])
    by_steps = {r["steps"]: r for r in vanilla}
    reference = by_steps[reference_steps]
    lat = np.array([r["latency_ms"] for r in vanilla])
    for r in rows:
        r["speedup_vs_reference"] = reference["latency_ms"] / r["latency_ms"]
        same = by_steps.get(r["steps"])
        r["speedup_vs_same_steps"] = same["latency_ms"] / r["latency_ms"] if same else None
        r["speedup_limit"] = r["steps"] / r["budget"]
        r["matched_vanilla_fid"] = None
        r["fid_gain_at_matched_latency"] = None
        r["beats_vanilla_beyond_uncertainty"] = None
        if r["sampler"] != "vanilla" and len(vanilla) > 1 and lat[0] <= r["latency_ms"] <= lat[-1]:
            interp = {k: float(np.interp(r["latency_ms"], lat, [v[k] for v in vanilla])) for k in ("fid", "fid_ci_low")}
            r["matched_vanilla_fid"] = interp["fid"]
            r["fid_gain_at_matched_latency"] = interp["fid"] - r["fid"]
            if "fid_ci_high" in r:
                r["beats_vanilla_beyond_uncertainty"] = r["fid_ci_high"] < interp["fid_ci_low"]
    return rows


def slowest_beaten_vanilla(rows: list[dict], row: dict) -> dict | None:
    """The fastest vanilla configuration that is still slower than `row` (None for vanilla rows or
    when every vanilla configuration is faster): the point `row` must beat on FID to dominate it."""
    if row["sampler"] == "vanilla":
        return None
    slower = [r for r in rows if r["sampler"] == "vanilla" and r["latency_ms"] >= row["latency_ms"]]
    return min(slower, key=lambda r: r["latency_ms"]) if slower else None


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _dominance(r: dict) -> str:
    if "faster_than" not in r:
        return "–"
    mark = " **better**" if r["dominates_slower_vanilla"] else ""
    return (f"{r['fid_minus_slower_vanilla']:+.2f} ({r['fid_minus_slower_vanilla_ci_low']:+.2f} to "
            f"{r['fid_minus_slower_vanilla_ci_high']:+.2f}) vs {r['faster_than']}{mark}")


def markdown_table(rows: list[dict], noise_floor: float, reference_steps: int, features: str = "domain-feature") -> str:
    """The report's table; `features` names what the FID is computed on. Columns a profile cannot
    fill (class accuracy without a domain classifier; FID against dataset statistics without them)
    show a dash or are left out."""
    dataset_fid = any("fid_dataset_stats" in r for r in rows)
    head = ("| Method | Configuration | Latency (ms/img) | Speedup vs N=%d | Speedup vs same N | FID (95%% CI) | "
            + ("FID vs dataset stats | " if dataset_fid else "")
            + "KID | Class acc. (worst class) | Vanilla FID at same latency | FID minus the next slower vanilla (paired 95%% CI) |\n"
            + "|---" * (10 + dataset_fid) + "|\n") % reference_steps
    lines = []
    for r in sorted(rows, key=lambda r: (r["sampler"] != "vanilla", r["sampler"], r["steps"], r["budget"])):
        config = f"{r['steps']} steps" + ("" if r["sampler"] == "vanilla" else f", B={r['budget']}")
        ci = f" ({r['fid_ci_low']:.2f}–{r['fid_ci_high']:.2f})" if "fid_ci_low" in r else ""
        accuracy = f"{r['class_accuracy']:.1%} ({r['worst_class_accuracy']:.0%})" if "class_accuracy" in r else "–"
        lines.append(
            f"| {r['sampler']} | {config} | {r['latency_ms']:.2f} | {r['speedup_vs_reference']:.2f}x | "
            f"{_fmt(r['speedup_vs_same_steps'], '.2f')}{'x' if r['speedup_vs_same_steps'] else ''} | {r['fid']:.2f}{ci} | "
            + (f"{_fmt(r.get('fid_dataset_stats'), '.2f')} | " if dataset_fid else "")
            + f"{r['kid_mean']:.3g} | {accuracy} | {_fmt(r['matched_vanilla_fid'], '.2f')} | {_dominance(r)} |"
        )
    n = rows[0]["num_samples"]
    return (head + "\n".join(lines) + f"\n\n{n} samples per configuration; {features} FID. Noise floor "
            f"(FID between two halves of the real reference set): {noise_floor:.2f}.\n")


def pareto_plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["sampler"], 0 if r["sampler"] == "vanilla" else r["steps"]), []).append(r)
    for (sampler, steps), group in sorted(groups.items()):
        group.sort(key=lambda r: r["latency_ms"])
        color, marker = SAMPLER_STYLE[sampler]
        label = "Vanilla" if sampler == "vanilla" else f"{sampler.capitalize()} (N={steps})"
        x, y = [r["latency_ms"] for r in group], [r["fid"] for r in group]
        # One colour per sampler; its curves at different N differ by line style.
        style = ["-", "--", ":", "-."][sorted(n for k, n in groups if k == sampler).index(steps) % 4]
        ax.plot(x, y, marker=marker, color=color, label=label, linestyle=style)
        if "fid_ci_low" in group[0]:
            ax.errorbar(x, y, yerr=[[r["fid"] - r["fid_ci_low"] for r in group], [r["fid_ci_high"] - r["fid"] for r in group]],
                        fmt="none", ecolor=color, alpha=0.4, capsize=2)
        for r in group:
            ax.annotate(f"{r['steps']}" if sampler == "vanilla" else f"B={r['budget']}", (r["latency_ms"], r["fid"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xlabel("latency (ms per image)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
