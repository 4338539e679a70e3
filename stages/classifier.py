"""Stage `classifier`: the evaluation's feature extractor.

Trained datasets: the domain classifier, the features of the second-view FID (beside Inception)
and of class accuracy. A published base or text to image: no classifier (their quality is
Inception FID, whose reference features stage `reference` computes, or CLIPScore).
"""

import torch

from migm_shortcut.checkpoint import save_model
from migm_shortcut.classifier import DomainClassifier, accuracy, fit_classifier
from migm_shortcut.data import load_splits

from .common import CLASSIFIER, DATA, SPLITS, no_training_curve, params, stage_args, training_run, write_json

OUT = CLASSIFIER.parent
METRICS = DATA / "metrics" / "classifier.json"


def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p = params()
    OUT.mkdir(parents=True, exist_ok=True)
    if p.is_text_to_image or p.is_published:
        quality = "CLIPScore against the prompts" if p.is_text_to_image else "Inception FID (stage reference)"
        write_json(OUT / "none.json", {"classifier": None, "quality": quality})
        write_json(METRICS, {"classifier": None})
        no_training_curve("classifier")
        print(f"classifier: none; quality is {quality}")
        return
    splits = load_splits(SPLITS)
    config = dict(num_classes=splits["train"].num_classes, feature_dim=p.classifier.feature_dim,
                  channels=splits["train"].images.shape[1])
    torch.manual_seed(p.classifier.seed)  # the initial weights too come from the seed, not from the process
    model = DomainClassifier(**config)
    with training_run(p, "classifier", params=p.classifier.model_dump()) as curve:
        metrics = fit_classifier(model, splits["train"], splits["val"], steps=p.classifier.steps,
                                 batch_size=p.classifier.batch_size, lr=p.classifier.lr, seed=p.classifier.seed,
                                 log=curve)
        metrics["test_accuracy"] = accuracy(model, splits["test"])
        save_model(CLASSIFIER, model, {"kind": "domain-classifier", "model": config})
        write_json(METRICS, metrics)
        curve.run.log_metrics(metrics)
    print(f"classifier: val accuracy {metrics['val_accuracy']:.2%}, test accuracy {metrics['test_accuracy']:.2%}")


if __name__ == "__main__":
    main()
