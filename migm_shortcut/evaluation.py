"""Scoring sample sets: tokens decoded batch by batch into feature extractors, FID with paired
bootstrap intervals in each feature space, CLIPScore for prompts, and the paired comparisons the
report's claims rest on.

A feature space is scored under a row-key prefix. `fid` is always the headline: the standard
Inception-v3 features when computed (the paper's protocol, SPEC section 7), else the domain
classifier's. `domain_fid` is the domain classifier's FID as a second view beside Inception: those
features were trained to tell classes apart and are close to blind to the local defects of stale
features (BENCHMARKS.md, sections 2 and 5), which is why they are not the headline.

Every set of a grid is sampled for the same classes (prompts) with the same per-sample seeds, so
row i of two sets belongs together: bootstrap resamples drawn with one seed pair the sets, and a
difference of two sets gets a paired interval in which the reference's noise cancels.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import Params
from .data import to_float
from .images import to_uint8
from .metrics import (ClassifierFeatures, ReferenceStats, bootstrap_fids, compute_metrics, extract_features,
                      fid_interval, fid_to_stats, knn_radii, mean_interval, paired_fid_difference)
from .report import Quality
from .samplers import BASELINES, SHORTCUT, VANILLA



@torch.no_grad()
def decoded_batches(base, tokens: Tensor, dev, batch_size: int) -> Iterator[tuple[slice, Tensor]]:
    """Decode tokens batch by batch, as 8-bit images like real ones: (the batch's samples, images)."""
    for first in range(0, len(tokens), batch_size):
        batch = slice(first, first + batch_size)
        yield batch, to_float(to_uint8(base.decode(tokens[batch].long().to(dev))))


@dataclass
class FeatureSpace:
    """Where FID is measured: an extractor (images in [0, 1] -> rows), the real reference's rows,
    and how many samples of each set it scores (the first `num_samples`; None: all). In the space
    with `all_metrics` (the domain classifier's) KID, precision/recall, IS and class accuracy too."""

    key: str  # row-key prefix: "fid" (the headline) or "domain_fid"
    extractor: Callable[[Tensor], Tensor]
    reference: Tensor
    num_samples: int | None = None
    all_metrics: bool = False


@torch.no_grad()
def decoded_features(base, tokens: Tensor, extractors: dict[str, tuple[Callable, int | None]], dev,
                     batch_size: int) -> dict[str, Tensor]:
    """{name: rows} of each extractor (fn, first n samples or None for all), one decoding pass."""
    out = {k: [] for k in extractors}
    needed = max(len(tokens) if n is None else n for _, n in extractors.values())
    for batch, images in decoded_batches(base, tokens[:needed], dev, batch_size):
        for k, (fn, n) in extractors.items():
            keep = len(images) if n is None else max(0, min(len(images), n - batch.start))
            if keep:
                out[k].append(fn(images[:keep]).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@dataclass
class Scores:
    """The quality of every sample set, as the report needs it."""

    rows: list[dict]  # one per set: its info.json and its metrics
    difference: Callable[[str, str, str], dict]  # (quality key, set a, set b): a minus b, paired


def _prefixed(metrics: dict, key: str) -> dict:
    """`fid...` keys of a metrics dict renamed to `key...` (e.g. fid_ci_low -> domain_fid_ci_low)."""
    return {(key + k[3:] if k.startswith("fid") else k): v for k, v in metrics.items()}


def fid_scores(base, sets: dict, spaces: list[FeatureSpace], dev, *, batch_size: int, bootstrap: int,
               kid_subset_size: int, classifier: Callable[[Tensor], Tensor] | None = None,
               dataset_stats: tuple[np.ndarray, np.ndarray] | None = None,
               progress: Callable[[str], None] = print) -> Scores:
    """FID with a bias-corrected bootstrap interval in every space for every set {name: (info,
    {tokens, labels})}; the classifier's logits (all samples) give IS and class accuracy;
    `dataset_stats` (mu, sigma of the first space's features, e.g. a published reference batch's
    dataset statistics) give `fid_dataset_stats`, the figure the literature reports."""
    radii = {s.key: knn_radii(s.reference) for s in spaces if s.all_metrics}  # once, not per set
    stats = {s.key: ReferenceStats.of(s.reference) for s in spaces}  # likewise
    dataset_ref = None if dataset_stats is None else ReferenceStats.of_moments(*dataset_stats)  # likewise
    extractors = {s.key: (s.extractor, s.num_samples) for s in spaces}
    if classifier is not None:
        extractors["logits"] = (classifier, None)
    rows, bootstraps = [], {s.key: {} for s in spaces}
    for i, (name, (info, arrays)) in enumerate(sets.items()):
        progress(f"evaluate: {name} ({i + 1} of {len(sets)})")
        feats = decoded_features(base, arrays["tokens"], extractors, dev, batch_size)
        logits, labels, row = feats.pop("logits", None), arrays["labels"], dict(info)
        for space in spaces:
            real, fake = space.reference, feats[space.key]
            if space.all_metrics:
                size = min(kid_subset_size, len(fake), len(real))
                row |= _prefixed(compute_metrics(real, fake, fake_logits=logits, labels=labels,
                                                 kid_subset_size=size, real_radii=radii.get(space.key)), space.key)
            # One seed for every set: the resamples of two sets pair up (paired_fid_difference).
            bootstraps[space.key][name] = bootstrap_fids(stats[space.key], fake, resamples=bootstrap)
            row |= {space.key: bootstraps[space.key][name][0], f"{space.key}_samples": len(fake),
                    **_prefixed(fid_interval(*bootstraps[space.key][name]), space.key)}
        if dataset_ref is not None:
            row["fid_dataset_stats"] = fid_to_stats(feats[spaces[0].key], dataset_ref)
        if logits is not None:
            correct = logits.argmax(1) == labels
            row["worst_class_accuracy"] = min(correct[labels == c].float().mean().item() for c in labels.unique())
        rows.append(row)

    def difference(key: str, a: str, b: str) -> dict:
        d = paired_fid_difference(bootstraps[key][a], bootstraps[key][b])
        return {"difference": d["fid_difference"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]}

    return Scores(rows, difference)


def clip_scores(scorer: Callable[[Tensor, list[str]], Tensor], prompts: list[str], base, sets: dict, dev, *,
                batch_size: int, bootstrap: int) -> Scores:
    """Text to image: CLIPScore of every image against its prompt. Every set draws the same prompts
    in the same order, so two sets compare image by image (a paired bootstrap of the differences)."""
    rows, scores = [], {}
    for name, (info, arrays) in sets.items():
        labels = arrays["labels"]
        scores[name] = torch.cat([scorer(images, [prompts[i] for i in labels[batch]])
                                  for batch, images in decoded_batches(base, arrays["tokens"], dev, batch_size)])
        m = mean_interval(scores[name], resamples=bootstrap)
        rows.append({**info, "clip_score": m["mean"], "clip_score_ci_low": m["ci_low"],
                     "clip_score_ci_high": m["ci_high"]})

    def difference(key: str, a: str, b: str) -> dict:
        m = mean_interval(scores[a] - scores[b], resamples=bootstrap)
        return {"difference": m["mean"], "ci_low": m["ci_low"], "ci_high": m["ci_high"]}

    return Scores(rows, difference)


def fastest_slower_vanilla(rows: list[dict], row: dict) -> dict | None:
    """The fastest vanilla configuration that is still slower than `row` (None for vanilla rows or
    when every vanilla configuration is faster): the point `row` must beat on quality to dominate it."""
    if row["sampler"] == VANILLA:
        return None
    slower = [r for r in rows if r["sampler"] == VANILLA and r["latency_ms"] >= row["latency_ms"]]
    return min(slower, key=lambda r: r["latency_ms"]) if slower else None


def _paired(row: dict, name: str, d: dict, quality: Quality) -> dict:
    """Row fields `name`, `name_ci_low/high` and `name_beyond_ci`: better even at the interval's
    least favourable end."""
    least = d["ci_low"] if quality.higher_is_better else d["ci_high"]
    return {name: d["difference"], f"{name}_ci_low": d["ci_low"], f"{name}_ci_high": d["ci_high"],
            f"{name}_beyond_ci": quality.gain(least, 0.0) > 0}


def add_paired_comparisons(rows: list[dict], scores: Scores, quality: Quality,
                           keys: tuple[str, ...]) -> list[dict]:
    """For each accelerated row, paired differences with their 95% intervals on quality `keys`
    (the headline first): against the fastest vanilla point slower than it (`dominates_slower_vanilla`
    when better beyond the interval on the headline), and for shortcut rows against each
    training-free baseline at the same (N, B) (`<key>_minus_reuse`, `<key>_minus_extrapolate`), and
    for a learned placement against the uniform one (`<key>_minus_uniform`)."""
    by_config = {(r["sampler"], r["steps"], r["budget"], r.get("placement", "uniform")): r for r in rows}
    q = keys[0]
    for row in rows:
        if (other := fastest_slower_vanilla(rows, row)) is not None:
            row |= {"faster_than": other["name"],
                    **_paired(row, f"{q}_minus_slower_vanilla", scores.difference(q, row["name"], other["name"]),
                              quality)}
            row["dominates_slower_vanilla"] = row[f"{q}_minus_slower_vanilla_beyond_ci"]
        if row["sampler"] != SHORTCUT:
            continue
        twins = {kind: (kind, row["steps"], row["budget"], "uniform") for kind in BASELINES}
        if row.get("placement") == "learned":
            twins = {"uniform": (SHORTCUT, row["steps"], row["budget"], "uniform")}
        for kind, config in twins.items():
            if (twin := by_config.get(config)) is not None:
                for key in keys:
                    row |= _paired(row, f"{key}_minus_{kind}", scores.difference(key, row["name"], twin["name"]),
                                   quality)
    return rows


def domain_space(classifier: torch.nn.Module, real_images: Tensor, dev, *, headline: bool,
                 batch_size: int = 250) -> FeatureSpace:
    """The domain classifier's feature space over uint8 `real_images`, with every metric: the
    headline `fid` without Inception, else the second view `domain_fid`."""
    domain = ClassifierFeatures(classifier)
    reference = extract_features(lambda x: domain(to_float(x)), real_images, batch_size=batch_size, device=dev)
    return FeatureSpace("fid" if headline else "domain_fid", domain, reference, all_metrics=True)


def metric_caption(spaces: list[FeatureSpace], floors: dict[str, float], inception: bool,
                   clip_model: str | None = None) -> str:
    """The report's note on which metric each claim rests on, and why; `clip_model`: text to image."""
    if clip_model:
        return f"CLIPScore ({clip_model}) of each image against its prompt; every claim rests on it."
    head = spaces[0]
    if inception:
        text = (f"Headline: FID on Inception-v3 pool features (the paper's protocol) against {len(head.reference)} "
                "reference images; every claim (speedup at equal quality, domination of a slower vanilla point, "
                "shortcut against reuse and extrapolation at the same N and B) rests on it.")
    else:
        text = f"FID on the domain classifier's features against {len(head.reference)} reference images."
    if len(spaces) > 1:
        text += (f" Domain FID: the domain classifier's features, all samples against {len(spaces[1].reference)}"
                 " images, a second view: trained to tell classes apart, they rank samplers by class-typical shape"
                 " and are close to blind to the local defects that stale features cause.")
    return text + " Noise floors (FID between two halves of the reference): " + ", ".join(
        f"{k} {v:.2f}" for k, v in floors.items()) + "."


def sampler_params(p: Params, row: dict) -> dict:
    """What a sampler configuration's run records: its setting, the sampling rule at its steps, and
    the shortcut's settings when it samples with one."""
    params = {"sampler": row["sampler"], "steps": row["steps"], "budget": row["budget"],
              "placement": row.get("placement", "uniform"),
              "sampling": {**p.sampling.model_dump(), "steps": row["steps"]}}
    return params | ({"shortcut": p.shortcut.model_dump()} if row["sampler"] == "shortcut" else {})


def sampler_metrics(row: dict) -> dict:
    """What a sampler configuration's run records as metrics: every number of its report row but
    the setting's steps and budget (params, in `sampler_params`)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("steps", "budget")}
