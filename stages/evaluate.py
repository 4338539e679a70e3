"""Stage `evaluate`: quality metrics of every sample set, speedups, the report and the Pareto plot.

Every sample folder is checked before anything is computed or logged: a missing or damaged one
stops the stage with its name, and earlier reports and MLflow runs stay as they were. Samples are
stored as tokens; they are decoded here batch by batch and go straight into the feature extractors,
so memory holds features, never a whole sample set's pixels.

Features: a trained dataset's domain classifier (FID, KID, precision/recall, IS, class accuracy),
plus Inception if `evaluate.inception`. A published base: Inception only, against the reference
batch's features (stage `classifier`), and also against the dataset statistics the reference batch
carries (`fid_dataset_stats`, the number the literature reports). Text to image (prompts): no
reference images, so CLIPScore of each image against its prompt takes FID's place.
"""

import json
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from migm_shortcut.bases import load_base
from migm_shortcut.data import reference_dataset_stats, to_float
from migm_shortcut.images import to_uint8
from migm_shortcut.metrics import (ClassifierFeatures, ClipScore, InceptionFeatures, bootstrap_fids, compute_metrics,
                                   extract_features, fid, fid_interval, fid_to_stats, knn_radii, mean_interval, noise_floor,
                                   paired_fid_difference)
from migm_shortcut.report import CLIP_SCORE, FID, add_comparisons, fastest_slower_vanilla, markdown_table, pareto_plot

from .base import MODEL as BASE_MODEL
from .classifier import REFERENCE_FEATURES, load_classifier
from .common import DATA, decode_batch, device, log_stage, params, read_json, write_json
from .prepare import PROMPTS, load_splits
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
def decoded_batches(base, tokens: torch.Tensor, dev, batch_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Decode tokens batch by batch, as 8-bit images like real ones: (the batch's samples, images)."""
    for first in range(0, len(tokens), batch_size):
        batch = slice(first, first + batch_size)
        yield batch, to_float(to_uint8(base.decode(tokens[batch].long().to(dev))))


@torch.no_grad()
def decoded_features(base, tokens: torch.Tensor, extractors: dict, dev, batch_size: int) -> dict[str, torch.Tensor]:
    """Run every extractor on each decoded batch."""
    out = {k: [] for k in extractors}
    for _, images in decoded_batches(base, tokens, dev, batch_size):
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


@dataclass
class Scores:
    """The quality of every sample set, as the report needs it."""

    rows: list[dict]  # one per set: its info.json and its metrics
    difference: Callable[[str, str], dict]  # set a minus set b, paired: {difference, ci_low, ci_high}
    summary: dict
    note: str  # ends the report table's caption


def fid_scores(p, base, sets: dict, dev) -> Scores:
    """Image datasets: FID (with intervals), KID, precision/recall, IS, class accuracy per set."""
    e = p.evaluate
    extractors, real_feats = reference(p, dev)
    dataset_stats = reference_dataset_stats(p.data.root) if p.is_published else None
    floor = noise_floor(real_feats[""])
    radii = knn_radii(real_feats[""])  # the reference's k-NN balls, for every set's precision
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
                                   kid_subset_size=min(e.kid_subset_size, len(feats[""]), len(real_feats[""])),
                                   real_radii=radii)
            # Same seed for every set: the resamples of two sets are paired (see paired_fid_difference).
            bootstraps[name] = bootstrap_fids(real_feats[""], feats[""], resamples=e.bootstrap)
            row |= fid_interval(*bootstraps[name])
        if dataset_stats is not None:
            row["fid_dataset_stats"] = fid_to_stats(feats[""], *dataset_stats)
        if logits is not None:
            correct = logits.argmax(1) == labels
            row["worst_class_accuracy"] = min(correct[labels == c].float().mean().item() for c in labels.unique())
        rows.append(row)

    def difference(a: str, b: str) -> dict:
        d = paired_fid_difference(bootstraps[a], bootstraps[b])
        return {"difference": d["fid_difference"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]}

    features = "Inception" if p.is_published else "domain-feature"
    note = f"{features} FID. Noise floor (FID between two halves of the real reference set): {floor:.2f}."
    return Scores(rows, difference, {"noise_floor_fid": floor, "num_reference": len(real_feats[""])}, note)


def clip_scores(p, base, sets: dict, dev) -> Scores:
    """Text to image: CLIPScore of every image against its prompt. Every set draws the same prompts
    in the same order, so two sets compare image by image (a paired bootstrap of the differences)."""
    prompts, scorer, e = read_json(PROMPTS)["eval"], ClipScore(p.evaluate.clip_model, dev), p.evaluate
    rows, scores = [], {}
    for name, (info, arrays) in sets.items():
        labels = arrays["labels"]
        scores[name] = torch.cat([scorer(images, [prompts[i] for i in labels[batch]])
                                  for batch, images in decoded_batches(base, arrays["tokens"], dev, decode_batch(p))])
        m = mean_interval(scores[name], resamples=e.bootstrap)
        rows.append({**info, "clip_score": m["mean"], "clip_score_ci_low": m["ci_low"], "clip_score_ci_high": m["ci_high"]})

    def difference(a: str, b: str) -> dict:
        m = mean_interval(scores[a] - scores[b], resamples=e.bootstrap)
        return {"difference": m["mean"], "ci_low": m["ci_low"], "ci_high": m["ci_high"]}

    note = f"CLIPScore ({p.evaluate.clip_model}) of each image against its prompt, {len(prompts)} prompts."
    return Scores(rows, difference, {"num_prompts": len(prompts)}, note)


def main() -> None:
    p, dev = params(), device()
    start = time.perf_counter()
    base = load_base(BASE_MODEL, dev)
    sets = {s.name: load_sample_set(s.name, p.sample.num_samples, base.num_tokens) for s in p.sample.settings()}
    quality = CLIP_SCORE if p.is_text_to_image else FID
    scores = (clip_scores if p.is_text_to_image else fid_scores)(p, base, sets, dev)
    q, summary = quality.key, scores.summary
    rows = add_comparisons(scores.rows, p.sampling.steps, quality)
    for row in rows:  # paired test against the vanilla point this configuration is faster than
        if (other := fastest_slower_vanilla(rows, row)) is not None:
            d = scores.difference(row["name"], other["name"])
            # dominates: even the interval's least favourable end is better than that vanilla point
            least = d["ci_low"] if quality.higher_is_better else d["ci_high"]
            row |= {"faster_than": other["name"], f"{q}_minus_slower_vanilla": d["difference"],
                    f"{q}_minus_slower_vanilla_ci_low": d["ci_low"], f"{q}_minus_slower_vanilla_ci_high": d["ci_high"],
                    "dominates_slower_vanilla": quality.gain(least, 0.0) > 0}

    OUT.mkdir(parents=True, exist_ok=True)
    pareto_plot(rows, OUT / "pareto.png", f"{p.data.dataset}: {quality.label} vs latency ({p.sample.num_samples} samples each)",
                quality)
    (OUT / "report.md").write_text(markdown_table(rows, p.sampling.steps, quality, scores.note))
    write_json(OUT / "pareto.json", [{k: r[k] for k in ("name", "sampler", "steps", "budget", "latency_ms", q)} for r in rows])
    summary["seconds"] = time.perf_counter() - start
    write_json(OUT / "metrics.json", {"summary": summary, **{r["name"]: r for r in rows}})

    for r in rows:
        numbers = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("steps", "budget")}
        log_stage(p, r["name"], params={"sampler": r["sampler"], "steps": r["steps"], "budget": r["budget"]},
                  metrics=numbers, artifacts=[SAMPLES / r["name"] / "grid.png"])
    log_stage(p, "evaluate", params=p.evaluate.model_dump(), metrics=summary,
              artifacts=[OUT / "pareto.png", OUT / "report.md", OUT / "metrics.json"])
    print((OUT / "report.md").read_text())


if __name__ == "__main__":
    main()
