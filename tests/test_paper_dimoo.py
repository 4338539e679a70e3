"""The paper-dimoo profile: it validates (its missing files are tested with the other paper profiles'),
and the whole DVC pipeline runs on a published-layout Lumina-DiMOO (tiny, random) exactly as on the real one:
prompts tokenized by the folder's own tokenizer, the DiMOO shortcut variant, CLIPScore in the report.

The published VQ model is a tiny random diffusers VQModel (the `dimoo` extra installs diffusers).
"""

import json

import numpy as np
import pytest
import yaml
from conftest import fresh_copy, run
from test_dimoo_adapter import TINY, random_state, write_published, write_vq_model
from test_metrics import tiny_clip
from test_paper_profiles import tiny_run

from migm_shortcut.config import ConfigError, load_params, parse_params
from migm_shortcut.schedules import SamplingRule

PROFILE = "profiles/paper-dimoo.yaml"

WORDS = "a an the red blue green cat dog house tree car boat on in under with image text prompt".split()
TRAIN = [f"{a} {b} {c}" for a in ("red", "blue", "green") for b in ("cat", "dog") for c in ("house", "tree")]  # 12
EVAL = ["a red boat", "the blue car under a tree", "green dog"]


def test_paper_dimoo_has_the_papers_sizes():
    p = load_params(PROFILE)
    assert (p.sampling.steps, p.sampling.cfg, p.sampling.schedule, p.sampling.ramp, p.sampling.tau) == (64, 4.0, "cosine", False, 1.0)
    assert p.extract.num_train == 2000 and p.num_tokens == 64 * 64 and p.base.published.codebook_size == 8192
    assert (p.base.depth, p.base.width, p.base.heads, p.base.width * p.base.mlp_ratio) == (32, 4096, 32, 12288)
    assert {(s.steps, s.budget) for s in p.sample.settings() if s.sampler == "shortcut"} >= {(64, 11)}
    assert p.is_text_to_image and p.evaluate.clip_model and not p.evaluate.inception


@pytest.mark.parametrize("change, message", [
    (lambda p: p["base"]["published"].pop("prompt_len"), "base.published.prompt_len: missing"),
    (lambda p: p["base"]["published"].update(codebook_size=1024), "Lumina-DiMOO's VQ has 8192 codes"),
    (lambda p: p["evaluate"].pop("clip_model"), "evaluate.clip_model: missing"),
    (lambda p: p["evaluate"].update(inception=True), "evaluate.inception must be false for dimoo"),
    (lambda p: p["data"].update(dataset="imagenet"), "data.dataset must be prompts"),
    (lambda p: p["base"]["published"]["files"].update(vq="x"), "base.published.files.vq: unknown file key"),
])  # fmt: skip
def test_bad_dimoo_params_name_the_key(change, message):
    raw = yaml.safe_load(open(PROFILE))
    change(raw)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(raw)


def test_prompts_and_clip_need_a_text_to_image_base():
    raw = yaml.safe_load(open("profiles/smoke.yaml"))
    with pytest.raises(ConfigError, match="evaluate.clip_model: CLIPScore needs prompts"):
        parse_params({**raw, "evaluate": {"clip_model": "/models/clip"}})
    with pytest.raises(ConfigError, match="data.dataset=prompts holds no training images"):
        parse_params({**raw, "data": {"dataset": "prompts", "root": "/prompts"}})


def write_tokenizer(folder):
    """A word-level text tokenizer in the published folder, read back through AutoTokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    markers = ["<system>", "</system>", "<user>", "</user>", "<uncondition>"]
    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", *markers, *WORDS, "Generate", "according", "to", "prompt."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"</?\w+>"), "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def tiny_dimoo_params(folder) -> dict:
    """paper-dimoo with a tiny published-layout Lumina-DiMOO, prompts and CLIP in `folder`."""
    model = write_published(folder / "Lumina-DiMOO", random_state(0))
    write_tokenizer(model)
    write_vq_model(model)
    (folder / "prompts").mkdir()
    (folder / "prompts" / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (folder / "prompts" / "eval.txt").write_text("\n\n".join(EVAL))  # empty lines are skipped
    (folder / "clip").mkdir()
    tiny_clip(folder / "clip")
    p = yaml.safe_load(open(PROFILE))
    p["data"] |= {"root": str(folder / "prompts"), "image_size": 64}
    p["base"] |= {"depth": TINY.n_layers, "width": TINY.d_model, "heads": TINY.n_heads,
                  "mlp_ratio": TINY.mlp_hidden_size / TINY.d_model}
    p["base"]["published"] |= {"files": {"model": str(model)}, "prompt_len": 24}
    p["evaluate"] |= {"clip_model": str(folder / "clip"), "bootstrap": 20}
    return tiny_run(p, "tiny-dimoo")


@pytest.fixture(scope="module")
def dimoo_project(tmp_path_factory):
    root = fresh_copy(tmp_path_factory.mktemp("dimoo"))
    files = tmp_path_factory.mktemp("dimoo-files")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_dimoo_params(files), sort_keys=False))
    run(["dvc", "repro"], root)
    return root


def test_text_to_image_base_runs_the_whole_pipeline(dimoo_project):
    from migm_shortcut.store import TrajectoryStore

    data = dimoo_project / "data"
    assert json.loads((data / "dataset/prompts.json").read_text()) == {"train": TRAIN, "eval": EVAL}
    ids = json.loads((data / "tokenizer/prompts.json").read_text())
    assert len(ids["train"]) == 12 and len(set(map(tuple, ids["eval"]))) == 3 and ids["uncond"] not in ids["train"]
    config = json.loads((data / "base/model.json").read_text())
    assert config["kind"] == "dimoo" and config["uncond_prompt"] == ids["uncond"] and config["prompt_len"] == 24
    store = TrajectoryStore.open(str(data / "trajectories.zarr"))
    assert store.labels.shape == (12, 24)  # trajectory i's condition: train prompt i, left-padded
    assert list(store.labels[0][-len(ids["train"][0]):]) == ids["train"][0]
    assert json.loads((data / "shortcut/model.json").read_text())["spec"]["variant"] == "dimoo"
    report = json.loads((data / "report/metrics.json").read_text())
    for name in ("vanilla-N2", "vanilla-N4", "shortcut-N4-B2", "reuse-N4-B2"):
        row = report[name]
        assert row["clip_score_ci_low"] <= row["clip_score"] <= row["clip_score_ci_high"] and "fid" not in row
    for row in report.values():  # at tiny sizes timing decides which vanilla point a row is faster than
        if "faster_than" in row:
            assert row["clip_score_minus_slower_vanilla_ci_low"] <= row["clip_score_minus_slower_vanilla"]
    assert report["summary"]["num_prompts"] == 3
    with np.load(data / "samples/shortcut-N4-B2/samples.npz") as z:
        assert z["tokens"].shape == (10, 16) and z["labels"].tolist() == [i % 3 for i in range(10)]
    table = (data / "report/report.md").read_text()
    assert "CLIPScore (95% CI)" in table and "KID" not in table and "Class acc." not in table
    assert "Data and pipelines are up to date" in run(["dvc", "status"], dimoo_project).stdout


def test_the_profiles_sampling_rule_reaches_the_samplers():
    rule = SamplingRule.of(load_params(PROFILE).sampling, 11)
    assert (rule.steps, rule.schedule, rule.ramp, rule.cfg, rule.tau) == (11, "cosine", False, 4.0, 1.0)
