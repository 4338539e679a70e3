"""Stage `evaluate`: quality metrics of every sample set, speedups, the report and the Pareto plot.

Every sample folder is checked before anything is computed or logged: a missing or damaged one
stops the stage with its name, and earlier reports and MLflow runs stay as they were. Samples are
stored as tokens; they are decoded here batch by batch and go straight into the feature extractors,
so memory holds features, never a whole sample set's pixels.

Features: a trained dataset's domain classifier (FID, KID, precision/recall, IS, class accuracy),
plus Inception if `evaluate.inception`. A published base: Inception only, against the reference
batch's features (stage `classifier`), and also against the dataset statistics the reference batch
carries (`fid_dataset_stats`, the number the literature reports).
"""

import json
import time
import zipfile

import numpy as np
import torch

from migm_shortcut.bases import load_base
from migm_shortcut.data import reference_dataset_stats, to_float
from migm_shortcut.images import to_uint8
from migm_shortcut.metrics import (ClassifierFeatures, InceptionFeatures, bootstrap_fids, compute_metrics,
                                   extract_features, fid, fid_interval, fid_to_stats, noise_floor,
                                   paired_fid_difference)
from migm_shortcut.report import add_comparisons, markdown_table, pareto_plot, slowest_beaten_vanilla

from .base import MODEL as BASE_MODEL
from .classifier import REFERENCE_FEATURES, load_classifier
from .common import DATA, decode_batch, device, log_stage, params, write_json
from .prepare import load_splits
from .sample import OUT as SAMPLES

OUT = DATA / "report"
BATCH = 250


def load_sample_set(name: str, num_samples: int, num_tokens: int) -> tuple[dict, dict]:
    folder = SAMPLES / name
    try:
        info = json.loads((folder / "info.json").read_text())
        with np.load(folder / "samples.npz") as z:
            arrays = {k: torch.from_numpy(z[k]) for k in ("labels", "tokens")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise SystemExit(f"error: sample set {folder} is missing or corrupt ({err}); rerun `dvc repro sample`")
    shape = tuple(arrays["tokens"].shape)
    if shape != (num_samples, num_tokens) or len(arrays["labels"]) != num_samples:
        raise SystemExit(f"error: sample set {folder} holds tokens {shape}, expected {(num_samples, num_tokens)}")
    return info, arrays


@torch.no_grad()
def decoded_features(base, tokens: torch.Tensor, extractors: dict, dev, batch_size: int) -> dict[str, torch.Tensor]:
    """Decode tokens batch by batch (as 8-bit images, like real ones) and run every extractor on each batch."""
    out = {k: [] for k in extractors}
    for batch in tokens.split(batch_size):
        images = to_float(to_uint8(base.decode(batch.long().to(dev))))
        for k, f in extractors.items():
            out[k].append(f(images).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def reference(p, dev) -> tuple[dict, dict]:
    """(extractors, real features): extractor "" gives the primary FID's features, "logits" the classifier's."""
    if p.is_published:
        with np.load(REFERENCE_FEATURES) as z:
            return {"": InceptionFeatures().to(dev)}, {"": torch.from_numpy(z["inception"])}
    e = p.evaluate
    real = load_splits()[e.reference]
    real = real.subset(torch.arange(min(e.num_reference, len(real))))
    classifier = load_classifier().to(dev)
    extractors = {"": ClassifierFeatures(classifier)}
    if e.inception:
        extractors["inception_"] = InceptionFeatures().to(dev)
    real_feats = {k: extract_features(lambda x, f=f: f(to_float(x)), real.images, batch_size=BATCH, device=dev)
                  for k, f in extractors.items()}
    return {**extractors, "logits": classifier}, real_feats


def main() -> None:
    p, dev = params(), device()
    e = p.evaluate
    start = time.perf_counter()
    base = load_base(BASE_MODEL, dev)
    settings = p.sample.settings()
    sets = {s.name: load_sample_set(s.name, p.sample.num_samples, base.num_tokens) for s in settings}
    extractors, real_feats = reference(p, dev)
    dataset_stats = reference_dataset_stats(p.data.root) if p.is_published else None
    floor = noise_floor(real_feats[""])

    rows, bootstraps = [], {}
    for name, (info, arrays) in sets.items():
        feats = decoded_features(base, arrays["tokens"], extractors, dev, decode_batch(p))
        logits, labels = feats.pop("logits", None), arrays["labels"]
        row = dict(info)
        for prefix in feats:
            if prefix:  # the literature's protocol beside the domain features: FID on Inception features
                row[f"{prefix}fid"] = fid(real_feats[prefix], feats[prefix])
                continue
            row |= compute_metrics(real_feats[""], feats[""], fake_logits=logits, labels=labels,
                                   kid_subset_size=min(e.kid_subset_size, len(feats[""]), len(real_feats[""])))
            # Same seed for every set: the resamples of two sets are paired (see paired_fid_difference).
            bootstraps[name] = bootstrap_fids(real_feats[""], feats[""], resamples=e.bootstrap)
            row |= fid_interval(*bootstraps[name])
        if dataset_stats is not None:
            row["fid_dataset_stats"] = fid_to_stats(feats[""], *dataset_stats)
        if logits is not None:
            correct = logits.argmax(1) == labels
            row["worst_class_accuracy"] = min(correct[labels == c].float().mean().item() for c in labels.unique())
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
    (OUT / "report.md").write_text(markdown_table(rows, floor, p.sampling.steps,
                                                  "Inception" if p.is_published else "domain-feature"))
    write_json(OUT / "pareto.json", [{k: r[k] for k in ("name", "sampler", "steps", "budget", "latency_ms", "fid")} for r in rows])
    summary = {"noise_floor_fid": floor, "num_reference": len(real_feats[""]), "seconds": time.perf_counter() - start}
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
