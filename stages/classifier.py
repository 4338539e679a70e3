"""Stage `classifier`: the evaluation's feature extractor.

Trained datasets: the domain classifier, the fast feature extractor for FID and class accuracy.
A published base: no classifier; the Inception features of the FID reference batch, computed once
here so that every sweep's evaluation reuses them. Text to image: nothing (CLIPScore has no reference).
"""

import time

import numpy as np
import torch

from migm_shortcut.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from migm_shortcut.classifier import DomainClassifier, accuracy, fit_classifier
from migm_shortcut.data import iter_reference_images, to_float
from migm_shortcut.metrics import InceptionFeatures

from .common import DATA, device, log_stage, params, stage_args, training_run, write_json
from .prepare import load_splits

OUT = DATA / "classifier"
MODEL = OUT / "model.safetensors"
REFERENCE_FEATURES = OUT / "reference_features.npz"
METRICS = DATA / "metrics" / "classifier.json"


def load_classifier() -> DomainClassifier:
    state, config = load_checkpoint(MODEL)
    model = DomainClassifier(**config["model"])
    load_state_strict(model, state, str(MODEL))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def reference_features(p, dev) -> dict:
    start = time.perf_counter()
    inception = InceptionFeatures().to(dev)
    feats = torch.cat([inception(to_float(x.to(dev))).cpu() for x in iter_reference_images(p.data.root, batch_size=100)])
    tmp = REFERENCE_FEATURES.with_suffix(".tmp.npz")
    np.savez(tmp, inception=feats.numpy())
    tmp.replace(REFERENCE_FEATURES)
    seconds = time.perf_counter() - start
    return {"num_reference": len(feats), "seconds": seconds, "images_per_second": len(feats) / seconds}


def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p = params()
    OUT.mkdir(parents=True, exist_ok=True)
    if p.is_text_to_image:
        write_json(OUT / "none.json", {"classifier": None, "quality": "CLIPScore against the prompts"})
        write_json(METRICS, {"classifier": None})
        print("classifier: none; text-to-image quality is CLIPScore, which needs no reference features")
        return
    if p.is_published:
        metrics = reference_features(p, device())
        write_json(METRICS, metrics)
        log_stage(p, "reference-features", metrics=metrics)
        print(f"classifier: none; Inception features of {metrics['num_reference']} reference images "
              f"({metrics['images_per_second']:.1f} images/s)")
        return
    splits = load_splits()
    config = dict(num_classes=splits["train"].num_classes, feature_dim=p.classifier.feature_dim,
                  channels=splits["train"].images.shape[1])
    model = DomainClassifier(**config)
    with training_run(p, "classifier", params=p.classifier.model_dump()) as curve:
        metrics = fit_classifier(model, splits["train"], splits["val"], steps=p.classifier.steps,
                                 batch_size=p.classifier.batch_size, lr=p.classifier.lr, seed=p.classifier.seed,
                                 log=curve)
        metrics["test_accuracy"] = accuracy(model, splits["test"])
        save_checkpoint(MODEL, model.state_dict(), {"kind": "domain-classifier", "model": config})
        write_json(METRICS, metrics)
        curve.run.log_metrics(metrics)
    print(f"classifier: val accuracy {metrics['val_accuracy']:.2%}, test accuracy {metrics['test_accuracy']:.2%}")


if __name__ == "__main__":
    main()
