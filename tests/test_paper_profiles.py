"""The paper profiles: they validate, `dvc repro` stops at once when their files are missing, and the
whole DVC pipeline runs on a published-layout MaskGIT (tiny, random) exactly as on the real one."""

import json
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import fresh_copy, run
from maskgit_manifest import transformer_keys, vqgan_decoder_keys
from test_maskgit_adapter import TINY, TINY_VQ, random_state, write_published

from migm_shortcut.config import ConfigError, load_params, parse_params

PAPER_PROFILES = ("paper-maskgit-256", "paper-maskgit-512")


@pytest.mark.parametrize("name", PAPER_PROFILES)
def test_paper_profile_has_the_papers_sizes(name):
    p = load_params(f"profiles/{name}.yaml")
    assert (p.extract.num_train, p.extract.num_val, p.sample.num_samples, p.sample.batch_size) == (50000, 1000, 50000, 128)
    assert (p.base.depth, p.base.width, p.base.heads, p.base.width * p.base.mlp_ratio) == (24, 768, 16, 3072)
    assert p.sampling.steps == 15 and p.evaluate.inception
    assert {(s.steps, s.budget) for s in p.sample.settings() if s.sampler == "shortcut"} == {(15, 7), (15, 8), (32, 8), (32, 9), (32, 12)}
    assert p.num_tokens == (p.data.image_size // 16) ** 2


@pytest.mark.parametrize("change, message", [
    (lambda p: p["base"]["published"]["files"].pop("vqgan"), "base.published.files.vqgan: missing; put last.ckpt"),
    (lambda p: p["base"]["published"]["files"].update(vae="x"), "base.published.files.vae: unknown file key"),
    (lambda p: p["base"].pop("published"), "base.published: base.name='maskgit-imagenet' is read from published files"),
    (lambda p: p["evaluate"].update(inception=False), "evaluate.inception must be true"),
    (lambda p: p["data"].update(dataset="mnist"), "data.dataset must be imagenet"),
    (lambda p: p["data"].update(image_size=500), "data.image_size=500 must be a multiple of 16"),
    (lambda p: p["sample"].update(num_samples=128), "must hold more full batches"),
])  # fmt: skip
def test_bad_paper_params_name_the_key(change, message):
    raw = yaml.safe_load(open("profiles/paper-maskgit-512.yaml"))
    change(raw)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(raw)


def test_a_trained_base_rejects_published_files():
    raw = yaml.safe_load(open("profiles/smoke.yaml"))
    raw["base"]["published"] = {"files": {"transformer": "t.pth"}}
    with pytest.raises(ConfigError, match="base.published: base.name='tiny-maskgit' is trained here"):
        parse_params(raw)


MISSING_FILE_LINES = {
    "paper-maskgit-512": (
        "base.published.files.transformer = /models/maskgit/MaskGIT/MaskGIT_ImageNet_512.pth: missing; "
        "put MaskGIT_ImageNet_512.pth from the Hugging Face repo llvictorll/Maskgit-pytorch",
        "base.published.files.vqgan = /models/maskgit/VQGAN/last.ckpt: missing",
        "data.root = /models/adm/VIRTUAL_imagenet512.npz: missing"),
    "paper-dimoo": (
        "base.published.files.model = /models/Lumina-DiMOO: missing; put the Hugging Face repo Alpha-VLLM/Lumina-DiMOO",
        "evaluate.clip_model = /models/clip-vit-large-patch14: no CLIP model there",
        "data.root: /models/dimoo-prompts/train.txt: missing; put the train prompts there"),
}


@pytest.mark.parametrize("profile", MISSING_FILE_LINES)
def test_dvc_repro_without_the_files_fails_at_once_naming_them(profile, tmp_path):
    root = fresh_copy(tmp_path)
    run([sys.executable, "-m", "stages.cli", "profile", profile], root)
    start = time.perf_counter()
    out = run(["dvc", "repro"], root, check=False)
    assert out.returncode != 0 and time.perf_counter() - start < 60
    for line in MISSING_FILE_LINES[profile]:
        assert line in out.stdout + out.stderr
    assert not (root / "data/dataset").exists()  # the first stage stopped before writing anything


def tiny_paper_params(folder) -> dict:
    """paper-maskgit-256 with the tiny published-layout model and a tiny reference batch in `folder`."""
    t_path, v_path = write_published(folder, random_state(transformer_keys(TINY), seed=0),
                                     random_state(vqgan_decoder_keys(TINY_VQ), seed=1))
    vq = TINY_VQ
    (folder / "model.yaml").write_text(yaml.safe_dump({"model": {"params": {
        "embed_dim": vq.embed_dim, "n_embed": vq.codebook,
        "ddconfig": {"z_channels": vq.z_channels, "resolution": vq.resolution, "ch": vq.ch, "ch_mult": list(vq.ch_mult),
                     "num_res_blocks": vq.num_res_blocks, "attn_resolutions": list(vq.attn_resolutions), "out_ch": 3}}}}))
    g = np.random.default_rng(0)
    mu, a = g.normal(size=2048), g.normal(size=(2048, 64))
    np.savez(folder / "reference.npz", arr_0=g.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8), mu=mu, sigma=a @ a.T / 64)
    p = yaml.safe_load(open("profiles/paper-maskgit-256.yaml"))
    p["data"] |= {"root": str(folder / "reference.npz"), "image_size": 64}
    p["base"] |= {"depth": TINY.depth, "width": TINY.hidden, "heads": TINY.heads, "mlp_ratio": TINY.mlp / TINY.hidden}
    p["base"]["published"] = {"files": {"transformer": str(t_path), "vqgan": str(v_path), "vqgan_yaml": str(folder / "model.yaml")},
                              "codebook_size": TINY.codebook, "num_classes": TINY.classes}
    p["evaluate"] |= {"bootstrap": 10, "kid_subset_size": 4}
    return tiny_run(p, "tiny-paper")


def tiny_run(p: dict, experiment: str) -> dict:
    """A paper profile's run cut to seconds: 12 trajectories of N = 4, a few shortcut updates, a
    4-configuration grid of 10 samples. Shared by the paper-profile pipeline tests."""
    p["sampling"]["steps"] = 4
    p["extract"] |= {"num_train": 8, "num_val": 4, "unit_size": 4, "batch_size": 4}
    p["shortcut"] |= {"heads": 2, "steps": 6, "batch_size": 8, "pairs_per_trajectory": 4, "lr_decay_at": 4,
                      "ema_warmup": 2, "num_workers": 0}
    p["sample"] |= {"num_samples": 10, "batch_size": 4, "threads": 1, "vanilla_steps": [2, 4],
                    "shortcut": [{"steps": 4, "budgets": [2]}], "baselines": ["reuse"], "baseline_steps": [4]}
    p["tracking"]["experiment"] = experiment
    return p


@pytest.fixture(scope="module")
def paper_project(tmp_path_factory):
    root = fresh_copy(tmp_path_factory.mktemp("paper"))
    weights = tmp_path_factory.mktemp("weights")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_paper_params(weights), sort_keys=False))
    run(["dvc", "repro"], root)
    return root


def test_published_base_runs_the_whole_pipeline(paper_project):
    data = paper_project / "data"
    assert json.loads((data / "tokenizer/published.json").read_text())["trained"] is False
    assert not (data / "tokenizer/model.safetensors").exists() and not (data / "classifier/model.safetensors").exists()
    with np.load(data / "reference/inception.npz") as z:
        assert z["inception"].shape == (12, 2048)
    assert json.loads((data / "base/model.json").read_text())["kind"] == "maskgit-imagenet"
    report = json.loads((data / "report/metrics.json").read_text())
    names = {"vanilla-N2", "vanilla-N4", "shortcut-N4-B2", "reuse-N4-B2"}
    assert names <= set(report)
    for name in names:
        row = report[name]
        assert row["num_samples"] == 10 and row["fid"] > 0 and row["fid_dataset_stats"] > 0
        assert "class_accuracy" not in row  # no domain classifier for ImageNet
        assert row["latency_repeats"] == 1  # 10 samples at batch 4: 2 full batches, 1 warm-up, 1 timed; 2 untimed
    assert "FID vs dataset stats" in (data / "report/report.md").read_text()
    with np.load(data / "samples/shortcut-N4-B2/samples.npz") as z:
        assert set(z.files) == {"tokens", "labels"} and z["tokens"].shape == (10, 16)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], paper_project).stdout


def test_published_base_is_imported_tensor_for_tensor(paper_project):
    from safetensors.torch import load_file

    imported = load_file(paper_project / "data/base/model.safetensors")
    published = random_state(transformer_keys(TINY), seed=0)
    assert all(torch.equal(imported[f"vit.{k}"], v) for k, v in published.items())
