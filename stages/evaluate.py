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

import time

import numpy as np
import torch

from migm_shortcut.bases import load_base
from migm_shortcut.checkpoint import load_model
from migm_shortcut.classifier import DomainClassifier
from migm_shortcut.data import load_splits, reference_dataset_stats
from migm_shortcut.evaluation import (FeatureSpace, add_paired_comparisons, clip_scores, domain_space, fid_scores,
                                      metric_caption, sampler_metrics, sampler_params)
from migm_shortcut.headline import headline, plot_rows
from migm_shortcut.metrics import ClipScore, InceptionFeatures, noise_floor
from migm_shortcut.report import CLIP_SCORE, Quality, add_comparisons, markdown_table, pareto_plot
from migm_shortcut.sample_folders import read_sample_set
from migm_shortcut.shortcut_model import registered_name, tag_with_headline

from .common import (BASE, CLASSIFIER, DATA, INCEPTION_REFERENCE, PROMPTS, SAMPLES, SHORTCUT, SHORTCUT_METRICS,
                     SPLITS, decode_batch, device, log_stage, params, project_root, read_json, stage_args,
                     stage_run, write_json)

OUT = DATA / "report"


def load_sample_set(name: str, num_samples: int, num_tokens: int) -> tuple[dict, dict]:
    try:
        return read_sample_set(SAMPLES / name, num_samples, num_tokens)
    except ValueError as err:
        raise SystemExit(f"error: {err}; rerun `dvc repro sample`")


def feature_spaces(p, dev) -> tuple[list[FeatureSpace], torch.nn.Module | None]:
    """The FID feature spaces, the headline first, and the domain classifier (None without one)."""
    spaces = []
    if p.is_published or p.evaluate.inception:
        with np.load(INCEPTION_REFERENCE) as z:
            real = torch.from_numpy(z["inception"])
        n = None if p.is_published else p.evaluate.inception_samples
        spaces.append(FeatureSpace("fid", InceptionFeatures(device=dev, dtype=getattr(torch, p.evaluate.inception_dtype)), real, n))
    if p.is_published:
        return spaces, None
    real = load_splits(SPLITS)[p.evaluate.reference]
    classifier = load_model(CLASSIFIER, lambda c: DomainClassifier(**c["model"]))[0].to(dev)
    spaces.append(domain_space(classifier, real.images[: p.evaluate.num_reference], dev, headline=not spaces))
    return spaces, classifier


def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p, dev = params(), device()
    with stage_run(p, "evaluate", params=p.evaluate.model_dump()) as run:
        evaluate(p, dev, run)


def evaluate(p, dev, run) -> None:
    """Score every sample set, write the report, log each configuration's run and the stage's."""
    start = time.perf_counter()
    base = load_base(BASE, dev)
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
    note = metric_caption(spaces, floors, inception, p.evaluate.clip_model if p.is_text_to_image else None)
    (OUT / "report.md").write_text(markdown_table(rows, p.sampling.steps, quality, note))
    write_json(OUT / "pareto.json", plot_rows(rows, quality))
    head = headline(rows, p.sampling.steps, quality, read_json(SHORTCUT_METRICS)["val_mse_ratio_mean"])
    write_json(OUT / "headline.json", head)
    summary["seconds"] = time.perf_counter() - start
    write_json(OUT / "metrics.json", {"summary": summary, **{r["name"]: r for r in rows}})

    for r in rows:  # one run a sampler configuration, beside the stage's
        log_stage(p, r["name"], params=sampler_params(p, r), metrics=sampler_metrics(r),
                  artifacts=[SAMPLES / r["name"] / "grid.png"])
    run.log_metrics(summary)
    tag_with_headline(project_root(), registered_name(p.tracking.experiment), SHORTCUT, head)
    run.log_artifacts([OUT / "pareto.png", OUT / "report.md", OUT / "metrics.json"])
    print((OUT / "report.md").read_text())
    print(f"evaluate: {len(rows)} configurations, {q} on {scores.rows[0].get(q + '_samples', '')} samples each")


if __name__ == "__main__":
    main()
