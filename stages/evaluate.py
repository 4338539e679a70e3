"""Stage `evaluate`: quality metrics of every sample set, speedups, the report and the Pareto plot.

Every sample folder is checked before anything is computed or logged: a missing or damaged one
stops the stage with its name, and earlier reports and MLflow runs stay as they were.
"""

import json
import time
import zipfile

import numpy as np
import torch

from migm_shortcut.data import to_float
from migm_shortcut.metrics import (ClassifierFeatures, InceptionFeatures, bootstrap_fids, compute_metrics,
                                   extract_features, fid, fid_interval, noise_floor, paired_fid_difference)
from migm_shortcut.report import add_comparisons, markdown_table, pareto_plot, slowest_beaten_vanilla

from .classifier import load_classifier
from .common import DATA, device, log_stage, params, write_json
from .prepare import load_splits
from .sample import OUT as SAMPLES

OUT = DATA / "report"


def load_sample_set(name: str, num_samples: int, image_shape: tuple) -> tuple[dict, dict]:
    folder = SAMPLES / name
    try:
        info = json.loads((folder / "info.json").read_text())
        with np.load(folder / "samples.npz") as z:
            arrays = {k: torch.from_numpy(z[k]) for k in ("images", "labels", "tokens")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise SystemExit(f"error: sample set {folder} is missing or corrupt ({err}); rerun `dvc repro sample`")
    shape = tuple(arrays["images"].shape)
    if shape != (num_samples, *image_shape) or len(arrays["labels"]) != num_samples:
        raise SystemExit(f"error: sample set {folder} holds images {shape}, expected {(num_samples, *image_shape)}")
    return info, arrays


def main() -> None:
    p, dev = params(), device()
    e = p.evaluate
    start = time.perf_counter()
    real = load_splits()[e.reference]
    real = real.subset(torch.arange(min(e.num_reference, len(real))))
    settings = p.sample.settings()
    sets = {s.name: load_sample_set(s.name, p.sample.num_samples, tuple(real.images.shape[1:])) for s in settings}

    classifier = load_classifier().to(dev)
    extractors = {"": ClassifierFeatures(classifier)}
    if e.inception:
        extractors["inception_"] = InceptionFeatures().to(dev)
    embed = {prefix: (lambda x, f=f: f(to_float(x))) for prefix, f in extractors.items()}
    real_feats = {k: extract_features(f, real.images, batch_size=250, device=dev) for k, f in embed.items()}
    floor = noise_floor(real_feats[""])

    rows, bootstraps = [], {}
    for name, (info, arrays) in sets.items():
        logits = extract_features(lambda x: classifier(to_float(x)), arrays["images"], batch_size=250, device=dev)
        row = dict(info)
        for prefix, f in embed.items():
            feats = extract_features(f, arrays["images"], batch_size=250, device=dev)
            if prefix:  # the literature's protocol: FID and KID on Inception features
                row[f"{prefix}fid"] = fid(real_feats[prefix], feats)
                continue
            row |= compute_metrics(real_feats[prefix], feats, fake_logits=logits, labels=arrays["labels"],
                                   kid_subset_size=min(e.kid_subset_size, len(feats), len(real.images)))
            # Same seed for every set: the resamples of two sets are paired (see paired_fid_difference).
            bootstraps[name] = bootstrap_fids(real_feats[prefix], feats, resamples=e.bootstrap)
            row |= fid_interval(*bootstraps[name])
        correct = logits.argmax(1) == arrays["labels"]
        row["worst_class_accuracy"] = min(correct[arrays["labels"] == c].float().mean().item() for c in arrays["labels"].unique())
        rows.append(row)
    rows = add_comparisons(rows, p.sampling.steps)
    for row in rows:  # paired test against the vanilla point this configuration is faster than
        if (other := slowest_beaten_vanilla(rows, row)) is not None:
            diff = paired_fid_difference(bootstraps[row["name"]], bootstraps[other["name"]])
            row |= {"faster_than": other["name"], "fid_minus_slower_vanilla": diff["fid_difference"],
                    "fid_minus_slower_vanilla_ci_low": diff["ci_low"], "fid_minus_slower_vanilla_ci_high": diff["ci_high"],
                    "dominates_slower_vanilla": diff["ci_high"] < 0}

    OUT.mkdir(parents=True, exist_ok=True)
    pareto_plot(rows, OUT / "pareto.png", f"{p.data.dataset}: FID vs latency ({p.sample.num_samples} samples each)")
    (OUT / "report.md").write_text(markdown_table(rows, floor, p.sampling.steps))
    write_json(OUT / "pareto.json", [{k: r[k] for k in ("name", "sampler", "steps", "budget", "latency_ms", "fid")} for r in rows])
    summary = {"noise_floor_fid": floor, "num_reference": len(real), "seconds": time.perf_counter() - start}
    write_json(OUT / "metrics.json", {"summary": summary, **{r["name"]: r for r in rows}})

    for r in rows:
        numbers = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("steps", "budget")}
        log_stage(p, r["name"], params={"sampler": r["sampler"], "steps": r["steps"], "budget": r["budget"]},
                  metrics=numbers, artifacts=[SAMPLES / r["name"] / "grid.png"])
    log_stage(p, "evaluate", params=e.model_dump(), metrics=summary,
              artifacts=[OUT / "pareto.png", OUT / "report.md", OUT / "metrics.json"])
    print((OUT / "report.md").read_text())


if __name__ == "__main__":
    main()
