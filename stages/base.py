"""Stage `base`: train the base MaskGIT on the token grids (its sample grids come from `sample`)."""

import hashlib

import numpy as np
import torch

from migm_shortcut.bases import build_base, save_base
from migm_shortcut.train_base import train_base

from .common import DATA, device, log_stage, params, write_json
from .tokenizer import CODES, load_tokenizer

OUT = DATA / "base"
MODEL = OUT / "model.safetensors"


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    p, dev = params(), device()
    tokenizer, tok_config = load_tokenizer()
    with np.load(CODES) as z:
        codes = {k: torch.from_numpy(z[k].astype(np.int64)) for k in z.files}
    num_classes = int(codes["train_labels"].max()) + 1
    b = p.base
    config = {"kind": b.name, "tokenizer": tok_config["model"], "num_classes": num_classes,
              "model": dict(depth=b.depth, width=b.width, heads=b.heads, mlp_ratio=b.mlp_ratio, label_dropout=b.label_dropout)}
    torch.manual_seed(b.seed)
    base = build_base(config)
    base.tokenizer.load_state_dict(tokenizer.state_dict())
    base.to(dev)
    history = []
    metrics = train_base(base, codes["train_codes"], codes["train_labels"], codes["val_codes"], codes["val_labels"],
                         steps=b.steps, batch_size=b.batch_size, lr=b.lr, warmup=b.warmup, weight_decay=b.weight_decay,
                         seed=b.seed, device=dev, log=lambda step, stats: history.append({"step": step, **stats}))
    config["hash"] = weights_hash(base.state_dict())
    save_base(base, MODEL, config)
    metrics["transformer_parameters"] = base.transformer_parameters()
    write_json(OUT / "metrics.json", metrics)
    log_stage(p, "base", params=b.model_dump(), metrics=metrics, history=history)
    print(f"base: val loss {metrics['val_loss']:.3f}, {metrics['transformer_parameters'] / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
