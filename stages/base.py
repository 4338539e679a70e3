"""Stage `base`: train the base MaskGIT on the token grids (its sample grids come from `sample`).

A published base is imported instead: its files are read and checked tensor by tensor against the
architecture in params.yaml, then saved as the project's checkpoint. Every later stage, and every
GPU worker that pulls the DVC remote, then loads one format and needs no access to the originals
(Lumina-DiMOO's VQ decoder excepted: a diffusers model, read from base.published.files.model by the
stages that decode, `sample` for its grids and `evaluate`).
"""

from pathlib import Path

import numpy as np
import torch

from migm_shortcut.bases import build_base, tiny_maskgit_config
from migm_shortcut.bases.published import load_published
from migm_shortcut.checkpoint import load_model, save_model, weights_hash
from migm_shortcut.tokenizer import VQTokenizer
from migm_shortcut.train_base import train_base
from migm_shortcut.training import TrainingState

from .common import (BASE, CODES, PROMPT_IDS, TOKENIZER, device, no_training_curve, params, read_json,
                     stage_args, stage_run, training_run, write_json)

OUT = BASE.parent
RESUME = Path(".migm") / "resume" / "base.pt"  # outside DVC's outputs, which a rerun deletes first


def import_published(p) -> None:
    b, files = p.base, {k: path for k, (path, _) in p.published_files().items()}
    with stage_run(p, "base", params={"name": b.name, **files}) as run:
        uncond = read_json(PROMPT_IDS)["uncond"] if b.name == "dimoo" else None
        try:
            base, extra = load_published(b, p.data.image_size, uncond)
        except ValueError as err:
            raise SystemExit(f"error: {err}")
        config = {**base.config(), **extra, "hash": weights_hash(base.state_dict())}
        save_model(BASE, base, config)
        metrics = {"transformer_parameters": base.transformer_parameters(), "imported": True}
        write_json(OUT / "metrics.json", metrics)
        no_training_curve("base")
        run.log_metrics(metrics)
    print(f"base: imported {b.name} ({metrics['transformer_parameters'] / 1e6:.1f}M transformer parameters)")


def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p, dev = params(), device()
    if p.is_published:
        return import_published(p)
    tokenizer, tok_config = load_model(TOKENIZER, lambda c: VQTokenizer(**c["model"]))
    with np.load(CODES) as z:
        codes = {k: torch.from_numpy(z[k].astype(np.int64)) for k in z.files}
    num_classes = int(codes["train_labels"].max()) + 1
    b = p.base
    config = tiny_maskgit_config(b, tok_config["model"], num_classes)
    torch.manual_seed(b.seed)
    base = build_base(config)
    base.tokenizer.load_state_dict(tokenizer.state_dict())
    base.to(dev)
    fingerprint = {"params": b.model_dump(exclude={"checkpoint_minutes"}), "config": config, "codes": weights_hash(codes)}
    with training_run(p, "base", params=b.model_dump()) as curve:
        state = TrainingState(RESUME, fingerprint, b.checkpoint_minutes, curve.points)
        metrics = train_base(base, codes["train_codes"], codes["train_labels"], codes["val_codes"], codes["val_labels"],
                             steps=b.steps, batch_size=b.batch_size, lr=b.lr, warmup=b.warmup,
                             weight_decay=b.weight_decay, seed=b.seed, device=dev, log=curve, state=state)
        config["hash"] = weights_hash(base.state_dict())
        save_model(BASE, base, config)
        metrics["transformer_parameters"] = base.transformer_parameters()
        write_json(OUT / "metrics.json", metrics)
        curve.run.log_metrics(metrics)
        state.remove()
    print(f"base: val loss {metrics['val_loss']:.3f}, {metrics['transformer_parameters'] / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
