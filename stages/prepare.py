"""Stage `prepare`: load the dataset, cut deterministic train/val/test splits, store them as one file.

For a published base there is no training set. data.dataset = imagenet: the stage checks the FID
reference batch (data.root) and records what it holds; the classifier stage reads its images.
data.dataset = prompts (text to image): it copies the prompt sets (data.root/train.txt, eval.txt)
into the pipeline, where the tokenizer stage turns them into the base's conditions.
"""

from migm_shortcut.data import DatasetNotFoundError, load_dataset, read_prompts, reference_batch_info, save_splits

from .common import DATA, PROMPTS, SPLITS, params, stage_args, write_json

INFO = DATA / "metrics" / "prepare.json"


def main(argv=None) -> None:
    stage_args(__doc__, argv)
    p = params()
    (DATA / "dataset").mkdir(parents=True, exist_ok=True)
    if p.data.dataset == "imagenet":
        try:
            info = {"dataset": "imagenet", "reference": p.data.root, **reference_batch_info(p.data.root, p.data.image_size)}
        except ValueError as err:
            raise SystemExit(f"error: data.root: {err}")
        write_json(DATA / "dataset" / "reference.json", info)
        write_json(INFO, info)
        print(info)
        return
    if p.is_text_to_image:
        prompts = read_prompts(p.data.root)  # params() has checked the files
        write_json(PROMPTS, prompts)
        info = {"dataset": "prompts", "root": p.data.root, **{f"{k}_prompts": len(v) for k, v in prompts.items()}}
        write_json(INFO, info)
        print(info)
        return
    try:
        splits = load_dataset(p.data.dataset, p.data.root, p.data.image_size, p.data.val_size, p.data.seed)
    except DatasetNotFoundError as err:
        raise SystemExit(f"error: {err}")
    save_splits(SPLITS, splits)
    info = {"dataset": p.data.dataset, "num_classes": splits["train"].num_classes,
            **{f"{k}_size": len(s) for k, s in splits.items()},
            "train_mean_pixel": float(splits["train"].images.float().mean())}
    write_json(INFO, info)
    print(info)


if __name__ == "__main__":
    main()
