"""Stage `classifier`: the domain classifier, the fast feature extractor for FID and class accuracy."""

from migm_shortcut.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from migm_shortcut.classifier import DomainClassifier, accuracy, fit_classifier

from .common import DATA, log_stage, params, write_json
from .prepare import load_splits

OUT = DATA / "classifier"
MODEL = OUT / "model.safetensors"


def load_classifier() -> DomainClassifier:
    state, config = load_checkpoint(MODEL)
    model = DomainClassifier(**config["model"])
    load_state_strict(model, state, str(MODEL))
    return model.eval().requires_grad_(False)


def main() -> None:
    p = params()
    splits = load_splits()
    config = dict(num_classes=splits["train"].num_classes, feature_dim=p.classifier.feature_dim,
                  channels=splits["train"].images.shape[1])
    model = DomainClassifier(**config)
    history = []
    metrics = fit_classifier(model, splits["train"], splits["val"], steps=p.classifier.steps,
                             batch_size=p.classifier.batch_size, lr=p.classifier.lr, seed=p.classifier.seed,
                             log=lambda step, stats: history.append({"step": step, **stats}))
    metrics["test_accuracy"] = accuracy(model, splits["test"])
    save_checkpoint(MODEL, model.state_dict(), {"kind": "domain-classifier", "model": config})
    write_json(OUT / "metrics.json", metrics)
    log_stage(p, "classifier", params=p.classifier.model_dump(), metrics=metrics, history=history)
    print(f"classifier: val accuracy {metrics['val_accuracy']:.2%}, test accuracy {metrics['test_accuracy']:.2%}")


if __name__ == "__main__":
    main()
