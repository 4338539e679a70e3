"""Stage `tokenizer`: train the VQ tokenizer, then encode the train and val splits to token grids.

A published base brings its own VQ model: the stage then only records that nothing was trained. A
text-to-image base's conditions are tokens too: its prompts are tokenized here with the base's own
text tokenizer (data/tokenizer/prompts.json: ids per prompt set, and the unconditional prompt's).
"""

import numpy as np
import torch

from migm_shortcut.checkpoint import save_model
from migm_shortcut.data import load_splits
from migm_shortcut.tokenizer import VQTokenizer, encode_dataset, fit_tokenizer, tokenizer_config

from .common import (CODES, DATA, PROMPT_IDS, PROMPTS, SPLITS, TOKENIZER, no_training_curve, params, read_json,
                     stage_args, training_run, write_json)

OUT = TOKENIZER.parent
METRICS = DATA / "metrics" / "tokenizer.json"


def tokenize(p) -> dict:
    """The prompt sets as the base's token ids; every prompt must fit base.published.prompt_len."""
    from migm_shortcut.bases.dimoo import tokenize_prompts  # transformers: imported only when needed

    prompts, limit = read_json(PROMPTS), p.base.published.prompt_len
    # One tokenizer load and one call for every prompt set, split again below.
    ids, uncond = tokenize_prompts(p.published_files()["model"][0], [t for texts in prompts.values() for t in texts])
    out, info, first = {}, {}, 0
    for name, texts in prompts.items():
        out[name], first = ids[first : first + len(texts)], first + len(texts)
        if too_long := [i for i, x in enumerate(out[name]) if len(x) > limit]:
            raise SystemExit(f"error: base.published.prompt_len={limit}: {len(too_long)} prompts of {p.data.root}/{name}.txt "
                             f"are longer once tokenized (prompts {[i + 1 for i in too_long[:5]]}, counting non-empty "
                             f"lines: up to {max(len(out[name][i]) for i in too_long)} ids); raise it or shorten them")
        info[f"{name}_prompt_ids_max"] = max(map(len, out[name]))
    write_json(PROMPT_IDS, {**out, "uncond": uncond})
    return info


def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p = params()
    OUT.mkdir(parents=True, exist_ok=True)
    if p.is_published:
        info = {"trained": False, "base": p.base.name, "codebook_size": p.base.published.codebook_size,
                **(tokenize(p) if p.is_text_to_image else {})}
        write_json(OUT / "published.json", info)
        no_training_curve("tokenizer")
        write_json(METRICS, info)
        print(f"tokenizer: none trained; {p.base.name} decodes with its published VQ model")
        return
    splits = load_splits(SPLITS)
    config = tokenizer_config(p.tokenizer, p.data.image_size, channels=splits["train"].images.shape[1])
    torch.manual_seed(p.tokenizer.seed)  # the initial weights too come from the seed, not from the process
    model = VQTokenizer(**config)
    with training_run(p, "tokenizer", params=p.tokenizer.model_dump()) as curve:
        metrics = fit_tokenizer(model, splits["train"].images, splits["val"].images, steps=p.tokenizer.steps,
                                batch_size=p.tokenizer.batch_size, lr=p.tokenizer.lr, seed=p.tokenizer.seed, log=curve)
        model.eval()
        save_model(TOKENIZER, model, {"kind": "vq-tokenizer", "model": config})
        codes = {f"{k}_codes": encode_dataset(model, splits[k].images).numpy().astype(np.int16) for k in ("train", "val")}
        np.savez(CODES, **codes, **{f"{k}_labels": splits[k].labels.numpy() for k in ("train", "val")})
        write_json(METRICS, metrics)
        curve.run.log_metrics(metrics)
    print(f"tokenizer: val mse {metrics['mse']:.4f}, codebook usage {metrics['usage']:.0%}, perplexity {metrics['perplexity']:.0f}")


if __name__ == "__main__":
    main()
