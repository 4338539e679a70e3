"""Stage `evaluate`: quality metrics of every sample set, speedups, the report and the Pareto plot.

Every sample folder is checked before anything is computed: a missing or damaged one stops the
stage with its name (the stage's MLflow run FAILED), and earlier reports and runs stay as they
were. Samples are stored as tokens; they are decoded here batch by batch and go straight into the
feature extractors (`migm_shortcut.evaluation`), so memory holds features, never a whole sample
set's pixels.

The headline quality (`fid` in every row) is FID on the standard Inception-v3 features when they
are computed: a published base always (against the reference batch's features, and
`fid_dataset_stats` against the dataset statistics it carries, the literature's figure); a
trained dataset with `evaluate.inception` (the first `evaluate.inception_samples` samples of each
set against the features stage `reference` computed). A trained dataset's domain classifier gives
the second view (`domain_fid`, KID, precision/recall, IS, class accuracy on all samples), or the
headline when Inception is off. Text to image (prompts): CLIPScore of each image against its prompt.
"""

import json
import time
import zipfile

import numpy as np
import torch

from migm_shortcut.bases import load_base
from migm_shortcut.data import reference_dataset_stats, to_float
from migm_shortcut.evaluation import FeatureSpace, add_paired_comparisons, clip_scores, fid_scores
from migm_shortcut.headline import headline, plot_rows
from migm_shortcut.metrics import ClassifierFeatures, ClipScore, InceptionFeatures, extract_features, noise_floor
from migm_shortcut.report import CLIP_SCORE, Quality, add_comparisons, markdown_table, pareto_plot
from migm_shortcut.shortcut_model import registered_name, tag_with_headline

from .base import MODEL as BASE_MODEL
from .classifier import load_classifier
from .common import (DATA, decode_batch, device, log_stage, params, project_root, read_json, sampler_params,
                     stage_args, stage_run, write_json)
from .prepare import PROMPTS, load_splits
from .reference import FEATURES as INCEPTION_REFERENCE
from .sample import OUT as SAMPLES
from .train_shortcut import METRICS as SHORTCUT_METRICS
from .train_shortcut import MODEL as SHORTCUT_MODEL

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


def feature_spaces(p, dev) -> tuple[list[FeatureSpace], torch.nn.Module | None]:
    """The FID feature spaces, the headline first, and the domain classifier (None without one)."""
    spaces = []
    if p.is_published or p.evaluate.inception:
        with np.load(INCEPTION_REFERENCE) as z:
            real = torch.from_numpy(z["inception"])
        n = None if p.is_published else p.evaluate.inception_samples
        spaces.append(FeatureSpace("fid", InceptionFeatures(device=dev), real, n))
    if p.is_published:
        return spaces, None
    e = p.evaluate
    real = load_splits()[e.reference]
    real = real.subset(torch.arange(min(e.num_reference, len(real))))
    classifier = load_classifier().to(dev)
    domain = ClassifierFeatures(classifier)
    feats = extract_features(lambda x: domain(to_float(x)), real.images, batch_size=BATCH, device=dev)
    spaces.append(FeatureSpace("domain_fid" if spaces else "fid", domain, feats, all_metrics=True))
    return spaces, classifier


def caption(p, spaces: list[FeatureSpace], floors: dict, inception: bool) -> str:
    """Which metric each claim rests on, and why."""
    if p.is_text_to_image:
        return f"CLIPScore ({p.evaluate.clip_model}) of each image against its prompt; every claim rests on it."
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


def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p, dev = params(), device()
    with stage_run(p, "evaluate", params=p.evaluate.model_dump()) as run:
        evaluate(p, dev, run)


def evaluate(p, dev, run) -> None:
    """Score every sample set, write the report, log each configuration's run and the stage's."""
    start = time.perf_counter()
    base = load_base(BASE_MODEL, dev)
    sets = {s.name: load_sample_set(s.name, p.sample.num_samples, base.num_tokens) for s in p.sample.settings()}
    batch = decode_batch(p)
    if p.is_text_to_image:
        quality, spaces, floors, inception = CLIP_SCORE, [], {}, False
        scorer, prompts = ClipScore(p.evaluate.clip_model, dev), read_json(PROMPTS)["eval"]
        scores = clip_scores(scorer, prompts, base, sets, dev, batch_size=batch, bootstrap=p.evaluate.bootstrap)
        summary = {"num_prompts": len(prompts)}
    else:
        spaces, classifier = feature_spaces(p, dev)
        inception = isinstance(spaces[0].extractor, InceptionFeatures)
        quality = Quality("fid", "Inception FID" if inception else "FID", higher_is_better=False)
        stats = reference_dataset_stats(p.data.root) if p.is_published else None
        scores = fid_scores(base, sets, spaces, dev, batch_size=batch, bootstrap=p.evaluate.bootstrap,
                            kid_subset_size=p.evaluate.kid_subset_size, classifier=classifier, dataset_stats=stats)
        floors = {s.key: noise_floor(s.reference) for s in spaces}
        summary = {f"noise_floor_{k}": v for k, v in floors.items()} | {
            f"num_reference_{s.key}": len(s.reference) for s in spaces}
    keys = tuple(s.key for s in spaces) or (quality.key,)
    rows = add_comparisons(scores.rows, p.sampling.steps, quality)
    rows = add_paired_comparisons(rows, scores, quality, keys)

    OUT.mkdir(parents=True, exist_ok=True)
    q = quality.key
    pareto_plot(rows, OUT / "pareto.png", f"{p.data.dataset}: {quality.label} vs latency", quality)
    note = caption(p, spaces, floors, inception)
    (OUT / "report.md").write_text(markdown_table(rows, p.sampling.steps, quality, note))
    write_json(OUT / "pareto.json", plot_rows(rows, quality))
    head = headline(rows, p.sampling.steps, quality, read_json(SHORTCUT_METRICS)["val_mse_ratio_mean"])
    write_json(OUT / "headline.json", head)
    summary["seconds"] = time.perf_counter() - start
    write_json(OUT / "metrics.json", {"summary": summary, **{r["name"]: r for r in rows}})

    for r in rows:
        numbers = {k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in ("steps", "budget")}
        log_stage(p, r["name"], params=sampler_params(p, r), metrics=numbers,
                  artifacts=[SAMPLES / r["name"] / "grid.png"])
    run.log_metrics(summary)
    tag_with_headline(project_root(), registered_name(p.tracking.experiment), SHORTCUT_MODEL, head)
    run.log_artifacts([OUT / "pareto.png", OUT / "report.md", OUT / "metrics.json"])
    print((OUT / "report.md").read_text())
    print(f"evaluate: {len(rows)} configurations, {q} on {scores.rows[0].get(q + '_samples', '')} samples each")


if __name__ == "__main__":
    main()
