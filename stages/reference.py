"""Stage `reference`: the Inception-v3 features of the real reference images, computed once.

FID on the standard Inception features is the headline wherever it is computed (the paper's
protocol); the network is the slow part of an evaluation on a CPU, so the reference's features are
a DVC output that every later evaluation and sweep reuses. A published base: the whole FID
reference batch. A trained dataset with `evaluate.inception`: the first `evaluate.inception_reference`
images of the `evaluate.reference` split. Otherwise (Inception off, or text to image) an empty record.
"""

import time

import numpy as np
import torch

from migm_shortcut.data import iter_reference_images, load_splits, to_float
from migm_shortcut.metrics import InceptionFeatures

from .common import INCEPTION_REFERENCE as FEATURES
from .common import DATA, SPLITS, device, params, stage_args, stage_run, write_json

OUT = FEATURES.parent
METRICS = DATA / "metrics" / "reference.json"
BATCH = 100


def reference_images(p):
    """uint8 batches [b, C, H, W] of the reference images whose features the headline FID needs."""
    if p.is_published:
        return iter_reference_images(p.data.root, batch_size=BATCH)
    real = load_splits(SPLITS)[p.evaluate.reference]
    n = min(p.evaluate.inception_reference, len(real))
    return (real.images[i : i + BATCH] for i in range(0, n, BATCH))


@torch.no_grad()
def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p, dev = params(), device()
    OUT.mkdir(parents=True, exist_ok=True)
    if p.is_text_to_image or not (p.is_published or p.evaluate.inception):
        np.savez(FEATURES, inception=np.zeros((0, InceptionFeatures.num_features), np.float32))
        write_json(METRICS, {"num_reference": 0})
        print("reference: no Inception features needed (evaluate.inception is off, or text to image)")
        return
    with stage_run(p, "reference", params={"evaluate.reference": p.evaluate.reference}) as run:
        start = time.perf_counter()
        inception = InceptionFeatures(device=dev, dtype=getattr(torch, p.evaluate.inception_dtype))
        feats = torch.cat([inception(to_float(x.to(dev))).cpu() for x in reference_images(p)])
        np.savez(OUT / "inception.tmp.npz", inception=feats.numpy())
        (OUT / "inception.tmp.npz").replace(FEATURES)
        seconds = time.perf_counter() - start
        metrics = {"num_reference": len(feats), "seconds": seconds, "images_per_second": len(feats) / seconds}
        write_json(METRICS, metrics)
        run.log_metrics(metrics)
    print(f"reference: Inception features of {len(feats)} images ({metrics['images_per_second']:.1f} images/s)")


if __name__ == "__main__":
    main()
