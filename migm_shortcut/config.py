"""Typed configuration: one pydantic model per `params.yaml` section.

The settings of a run live in two places. `params.yaml` holds the experiment: the keys that sweeps
vary (`EXPERIMENT`), which `dvc exp show` and `dvc params diff` list beside the headline metrics.
`config/<section>.yaml` holds every other setting of that section (training recipes, batch sizes,
plumbing), each written out; DVC reruns a stage when a config file it reads changes. A key written
in params.yaml overrides the same key in config/ (`dvc exp run -S +shortcut.heads=4` adds one).

A profile is one complete, commented file in `profiles/`; `migm profile NAME` validates it and
splits it into params.yaml and config/. Every error names the offending key (e.g.
`sample.shortcut[1].budgets`) and file, and is raised before any work starts.
"""

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from .samplers import BASELINES, SAMPLERS, SHORTCUT, VANILLA

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
CONFIG_DIR = "config"  # beside params.yaml

# The keys params.yaml holds: what the paper's figures and a new sweep vary, and the seeds of every
# stage (a second seed of the whole pipeline is an edit of these). With the headline metrics they
# stay within 40 columns of `dvc exp show`.
EXPERIMENT = {
    "data": ("dataset",),
    "tokenizer": ("seed",),
    "classifier": ("seed",),
    "base": ("name", "published", "depth", "width", "steps", "seed"),
    "sampling": ("steps", "cfg"),
    "extract": ("store", "num_train", "seed"),
    "shortcut": ("bottleneck_ratio", "unroll", "kl_weight", "steps", "lr", "seed"),
    "sample": ("num_samples", "vanilla_steps", "shortcut", "baselines", "baseline_steps", "seed"),
}


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; fail instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    # mnist | fashion-mnist | imagefolder: the training set of the trained base and the FID reference.
    # imagenet: only the FID reference of a published base, `root` = a reference batch .npz (the
    # ADM evaluation suite's format: uint8 images [n, H, W, 3] under arr_0).
    # prompts: the conditions of a text-to-image base, `root` = a folder with train.txt (extraction)
    # and eval.txt (sampling), one prompt per line.
    dataset: Literal["mnist", "fashion-mnist", "imagefolder", "imagenet", "prompts"] = "mnist"
    root: str | None = None  # folder of fashion-mnist IDX files or of an image folder; the imagenet .npz; the prompt folder
    image_size: int = Field(28, ge=8, multiple_of=4)  # the tokenizer downsamples by 4
    val_size: int = Field(5000, ge=1)
    seed: int = 0


class TokenizerConfig(Section):
    codebook_size: int = Field(256, ge=2)
    code_dim: int = Field(32, ge=1)
    hidden: int = Field(64, ge=8)
    ema_decay: float = Field(0.99, gt=0, lt=1)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


class ClassifierConfig(Section):
    feature_dim: int = Field(128, ge=2)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


# The files a published base is read from: key in `base.published.files` -> what to put there.
PUBLISHED_FILES = {
    "maskgit-imagenet": {
        "transformer": "MaskGIT_ImageNet_{image_size}.pth from the Hugging Face repo llvictorll/Maskgit-pytorch "
                       "(pretrained_maskgit/MaskGIT/; valeoai/Maskgit-pytorch's download_models.py fetches it)",
        "vqgan": "last.ckpt from the Hugging Face repo llvictorll/Maskgit-pytorch (pretrained_maskgit/VQGAN/)",
    },
    "dimoo": {
        "model": "the Hugging Face repo Alpha-VLLM/Lumina-DiMOO (a folder: config.json, model*.safetensors, "
                 "the text tokenizer's files and vqvae/)",
    },
}
OPTIONAL_FILES = {"maskgit-imagenet": {"vqgan_yaml": "model.yaml beside the VQGAN's last.ckpt (its sizes; "
                                                     "without it taming's f16/1024 defaults)"}}


def _file_keys(name: str) -> dict[str, str]:
    """Every file key a base may name (required, then optional) -> what to put there."""
    return {**PUBLISHED_FILES.get(name, {}), **OPTIONAL_FILES.get(name, {})}


PATCH = {"tiny-maskgit": 4, "maskgit-imagenet": 16, "dimoo": 16}  # image pixels per token side
DIMOO_CODEBOOK = 8192  # bases/dimoo.py's CODEBOOK, restated: the config stays free of torch and transformers


class PublishedBase(Section):
    """A pretrained base read from local files; the `base` stage imports it instead of training."""

    files: dict[str, str]  # keys: PUBLISHED_FILES[base.name] (+ OPTIONAL_FILES)
    codebook_size: int = Field(1024, ge=2)
    num_classes: int = Field(1000, ge=1)  # class-conditional bases
    prompt_len: int | None = Field(None, ge=1)  # text-to-image bases: prompt ids per condition (left-padded)


class BaseConfig(Section):
    """The base MIGM. `name` picks an entry of the base registry (`migm_shortcut.bases`).

    depth/width/heads/mlp_ratio are its architecture (for a published base: the published one, checked
    when the weights are imported); steps..weight_decay train the tiny base and are unused otherwise."""

    name: Literal["tiny-maskgit", "maskgit-imagenet", "dimoo"] = "tiny-maskgit"
    published: PublishedBase | None = None
    depth: int = Field(8, ge=1)
    width: int = Field(256, ge=8)
    heads: int = Field(8, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    label_dropout: float = Field(0.1, ge=0, lt=1)  # null-class rate that teaches the uncond branch
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(200, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    seed: int = 0
    checkpoint_minutes: float = Field(10.0, gt=0)  # work between saves of the training state (and on SIGTERM)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.width % self.heads:
            raise ValueError(f"base.width ({self.width}) must be divisible by base.heads ({self.heads})")
        return self


class SamplingConfig(Section):
    """The sampling rule shared by extraction and every sampler (SPEC sections 3 and 9)."""

    steps: int = Field(16, ge=2)  # N of the extracted trajectories and of the reference config
    cfg: float = Field(1.0, ge=0)  # w
    tau: float = Field(4.5, ge=0)  # Gumbel confidence noise
    temperature: float = Field(1.0, gt=0)
    schedule: Literal["arccos", "cosine"] = "arccos"  # MaskGIT's reveal schedule; cosine: Lumina-DiMOO's
    ramp: bool = True  # w ramps up from 0 and tau anneals to 0 over the steps (MaskGIT); false: both constant


class ExtractConfig(Section):
    store: str = Field("data/trajectories.zarr", min_length=1)  # a local path or any fsspec URL (s3://...)
    num_train: int = Field(2000, ge=1)
    num_val: int = Field(200, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    unit_size: int = Field(250, ge=1)  # samples per work unit (one shard of the store)
    batch_size: int = Field(125, ge=1)
    seed: int = 1


LossWeighting = Literal["position", "step"]
# adamw: AdamW on every weight; muon: Muon on the weight matrices, AdamW on the rest (training.MuonAdamW)
OptimizerKind = Literal["adamw", "muon"]


class ShortcutConfig(Section):
    bottleneck_ratio: int = Field(2, ge=1)
    blocks: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    cross_heads: int | None = Field(None, ge=1)  # the cross-attention's; None: `heads`
    # FFN hidden widths (before, after) the self-attention, in widths; None: 4x GELU (the SPEC's),
    # 6x SwiGLU for DiMOO. The one after runs only at the positions the sampler reads.
    ffn_ratios: tuple[PositiveInt, PositiveInt] | None = None
    cross_attention: bool = True  # ablation switch: False drops the new-token input
    time_embedding: bool = True  # ablation switch: False drops the mask-ratio conditioning
    unroll: int = Field(1, ge=1)  # chained shortcut steps per training example; 1 = the paper
    # The distillation term (SPEC section 5) on the guided token distribution, beside MSE (weight 1):
    # kl_weight * T^2 KL(true || predicted) at temperature T; 0 = MSE only (the paper's README).
    kl_weight: float = Field(0.0, ge=0)
    kl_temperature: float = Field(1.0, gt=0)
    # position: plain MSE over the loss positions; step: each step's error in units of reuse's
    # there, so late steps (small changes, few positions) weigh as much as early ones
    loss_weighting: LossWeighting = "position"
    steps: int = Field(3000, ge=1)
    # Counted in items, one CFG branch each: a batch holds both branches of each (sample, step).
    batch_size: int = Field(64, ge=2, multiple_of=2)
    pairs_per_trajectory: int = Field(16, ge=2, multiple_of=2)  # a batch streams from batch_size / this trajectories
    optimizer: OptimizerKind = "adamw"
    lr: float = Field(1e-3, gt=0)
    lr_decay_at: int = Field(2000, ge=0)  # lr drops 10x after this many updates
    weight_decay: float = Field(0.01, ge=0)
    ema_decay: float = Field(0.999, gt=0, lt=1)
    ema_warmup: int = Field(100, ge=0)  # EMA starts averaging after this many updates
    grad_clip: float = Field(1.0, gt=0)
    num_workers: int = Field(0, ge=0)  # streaming loader processes; none when held in memory
    # The training split's features are read into memory once when they take at most this many GB
    # (stored dtype; each data-parallel rank holds its own copy); larger splits stream from the store.
    in_memory_gb: float = Field(4.0, ge=0)
    seed: int = 0
    checkpoint_minutes: float = Field(10.0, gt=0)  # work between saves of the training state (and on SIGTERM)

    @property
    def memory_limit(self) -> int:
        """`in_memory_gb` in bytes, as `PairDataset` takes it."""
        return int(self.in_memory_gb * 1e9)


# uniform: the refreshes of SPEC section 6 (`schedules.refresh_steps`); learned: the steps where the
# shortcut's measured rollout error is least (`schedules.learned_refresh_steps`, stored by train_shortcut).
Placement = Literal["uniform", "learned"]


class ShortcutGrid(Section):
    steps: int = Field(ge=2)
    budgets: list[int] = Field(min_length=1)
    placement: Placement = "uniform"


class SamplerSetting(BaseModel):
    """One configuration of the sampling grid; `name` is its folder and its MLflow run name."""

    sampler: Literal[SAMPLERS]
    steps: int
    budget: int
    placement: Placement = "uniform"

    @property
    def name(self) -> str:
        if self.sampler == VANILLA:
            return f"{VANILLA}-N{self.steps}"
        learned = "-learned" if self.placement == "learned" else ""
        return f"{self.sampler}{learned}-N{self.steps}-B{self.budget}"


class SampleConfig(Section):
    """The grid of sampler configurations. Latency is timed on the sampling batches themselves
    (SPEC section 7): `warmup_batches` dropped, the median of the rest, per image."""

    num_samples: int = Field(1000, ge=1)
    batch_size: int = Field(125, ge=1)  # also the latency batch size (the paper: 128); a last partial batch is not timed
    warmup_batches: int = Field(1, ge=0)
    threads: int = Field(2, ge=1)  # CPU threads, fixed so runs compare: each samples a slice of every batch
    compile: bool = False  # torch.compile the base's forward and the shortcut's step (BENCHMARKS.md, section 1)
    seed: int = 12345
    vanilla_steps: list[int] = Field(min_length=1)
    shortcut: list[ShortcutGrid] = Field(default_factory=list)
    baselines: list[Literal[BASELINES]] = Field(default_factory=list)
    baseline_steps: list[int] = Field(default_factory=list)  # the N of `shortcut` at which baselines run

    def settings(self) -> list[SamplerSetting]:
        out = [SamplerSetting(sampler=VANILLA, steps=n, budget=n) for n in self.vanilla_steps]
        for grid in self.shortcut:
            out += [SamplerSetting(sampler=SHORTCUT, steps=grid.steps, budget=b, placement=grid.placement)
                    for b in grid.budgets]
            # The baselines follow the uniform grid, as in the paper; a learned placement is the shortcut's own.
            if grid.steps in self.baseline_steps and grid.placement == "uniform":
                out += [SamplerSetting(sampler=k, steps=grid.steps, budget=b) for k in self.baselines for b in grid.budgets]
        return out


class EvaluateConfig(Section):
    reference: Literal["test", "val", "train"] = "test"
    num_reference: int = Field(10000, ge=2)
    inception: bool = False  # the standard FID network (the headline when on): slow on a CPU
    inception_samples: int = Field(500, ge=2)  # the first n samples of every set go through Inception
    inception_reference: int = Field(2000, ge=2)  # reference images for Inception (stage reference)
    # bfloat16 doubles Inception's throughput on CPUs with AMX or AVX512-BF16 and on GPUs
    inception_dtype: Literal["float32", "bfloat16"] = "float32"
    clip_model: str | None = None  # text-to-image: a local CLIP folder for CLIPScore (e.g. openai/clip-vit-large-patch14)
    bootstrap: int = Field(200, ge=2)  # resamples for the FID intervals
    kid_subset_size: int = Field(500, ge=2)


class TrackingConfig(Section):
    experiment: str = "migm-shortcut"


class OrchestrationConfig(Section):
    """How the Prefect flows run a unit of work (an extraction shard, a sampler configuration)."""
    timeout_minutes: float = Field(1440, gt=0)  # a unit past it is stopped, not retried
    retries: int = Field(2, ge=0)  # only after a lost worker or a killed process
    retry_delay_seconds: int = Field(30, ge=0)


class Params(Section):
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    base: BaseConfig = BaseConfig()
    sampling: SamplingConfig = SamplingConfig()
    extract: ExtractConfig = ExtractConfig()
    shortcut: ShortcutConfig = ShortcutConfig()
    sample: SampleConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @property
    def num_tokens(self) -> int:
        """Image tokens per image: the tiny tokenizer downsamples by 4, the published VQ models by 16."""
        return (self.data.image_size // PATCH[self.base.name]) ** 2

    @property
    def is_published(self) -> bool:
        return self.base.published is not None

    @property
    def is_text_to_image(self) -> bool:
        return self.data.dataset == "prompts"

    def published_files(self) -> dict[str, tuple[str, str]]:
        """key -> (path, what to put there) for every file the published base is read from."""
        wanted = _file_keys(self.base.name)
        files = self.base.published.files if self.base.published else {}
        return {k: (path, wanted[k].format(image_size=self.data.image_size)) for k, path in files.items()}

    @model_validator(mode="after")
    def _possible(self):
        # Impossible combinations fail here, named by key, before any stage does work.
        self._published_base_fits()
        if self.evaluate.clip_model and not self.is_text_to_image:
            raise ValueError("evaluate.clip_model: CLIPScore needs prompts; it is for text-to-image profiles (data.dataset=prompts)")
        L = self.num_tokens

        def check_steps(key: str, n: int):
            if n < 1:
                raise ValueError(f"{key}={n} must be at least 1")
            if n > L:
                raise ValueError(f"{key}={n} exceeds the {L} image tokens (at least one token per step)")

        check_steps("sampling.steps", self.sampling.steps)
        for i, n in enumerate(self.sample.vanilla_steps):
            check_steps(f"sample.vanilla_steps[{i}]", n)
        for i, grid in enumerate(self.sample.shortcut):
            check_steps(f"sample.shortcut[{i}].steps", grid.steps)
            for b in grid.budgets:
                if not 1 <= b <= grid.steps:
                    raise ValueError(f"sample.shortcut[{i}].budgets: budget {b} must be in [1, steps={grid.steps}]")
        width = self.base.width // self.shortcut.bottleneck_ratio
        for key in ("heads", "cross_heads"):
            heads = getattr(self.shortcut, key) or 1
            if self.base.width % self.shortcut.bottleneck_ratio or width % heads:
                raise ValueError(f"shortcut.{key}={heads} must divide the shortcut width base.width / "
                                 f"shortcut.bottleneck_ratio = {self.base.width} / {self.shortcut.bottleneck_ratio}")
        sample = self.sample
        if sample.num_samples // sample.batch_size <= sample.warmup_batches:
            raise ValueError(f"sample.num_samples={sample.num_samples} must hold more full batches of sample.batch_size="
                             f"{sample.batch_size} than sample.warmup_batches={sample.warmup_batches} (latency repeats)")
        names = [s.name for s in self.sample.settings()]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"sample: configurations listed twice: {', '.join(dupes)}")
        if self.sampling.steps not in self.sample.vanilla_steps:
            raise ValueError(f"sample.vanilla_steps must include sampling.steps={self.sampling.steps} (the reference for speedups)")
        for i, n in enumerate(self.sample.baseline_steps):
            if n not in [g.steps for g in self.sample.shortcut]:
                raise ValueError(f"sample.baseline_steps[{i}]={n} is not the steps of any sample.shortcut entry")
        if self.shortcut.unroll >= self.sampling.steps:
            raise ValueError(f"shortcut.unroll={self.shortcut.unroll} must be below sampling.steps={self.sampling.steps}")
        trained_images = not (self.is_published or self.is_text_to_image)
        if trained_images and self.evaluate.inception and self.evaluate.inception_samples > self.sample.num_samples:
            raise ValueError(f"evaluate.inception_samples={self.evaluate.inception_samples} exceeds "
                             f"sample.num_samples={self.sample.num_samples}")
        if self.extract.batch_size > self.extract.unit_size or self.extract.unit_size % self.extract.batch_size:
            raise ValueError("extract.batch_size must divide extract.unit_size")
        return self

    def _published_base_fits(self):
        name, published, data = self.base.name, self.base.published, self.data
        if name not in PUBLISHED_FILES:
            if published is not None:
                raise ValueError(f"base.published: base.name={name!r} is trained here, not read from published files")
            if data.dataset in ("imagenet", "prompts"):
                raise ValueError(f"data.dataset={data.dataset} holds no training images; base.name={name!r} needs a training set")
            return
        if published is None:
            raise ValueError(f"base.published: base.name={name!r} is read from published files; give base.published.files "
                             f"({', '.join(PUBLISHED_FILES[name])})")
        for key in PUBLISHED_FILES[name]:
            if key not in published.files:
                raise ValueError(f"base.published.files.{key}: missing; put {PUBLISHED_FILES[name][key]} "
                                 f"there".format(image_size=data.image_size))
        for key in published.files:
            if key not in _file_keys(name):
                raise ValueError(f"base.published.files.{key}: unknown file key; known: {', '.join(_file_keys(name))}")
        if data.image_size % PATCH[name]:
            raise ValueError(f"data.image_size={data.image_size} must be a multiple of {PATCH[name]} for {name}")
        if name == "dimoo":
            return self._text_to_image_fits()
        if data.dataset != "imagenet" or not data.root:
            raise ValueError(f"data.dataset must be imagenet with data.root = the FID reference batch (.npz) for {name}")
        if not self.evaluate.inception:
            raise ValueError(f"evaluate.inception must be true for {name}: FID on Inception features is the only "
                             "quality metric without a domain classifier")

    def _text_to_image_fits(self):
        published = self.base.published
        if self.data.dataset != "prompts" or not self.data.root:
            raise ValueError("data.dataset must be prompts with data.root = a folder of train.txt and eval.txt for dimoo")
        if published.prompt_len is None:
            raise ValueError("base.published.prompt_len: missing; dimoo conditions are prompt ids left-padded to it")
        if published.codebook_size != DIMOO_CODEBOOK:
            raise ValueError(f"base.published.codebook_size={published.codebook_size}: Lumina-DiMOO's VQ has {DIMOO_CODEBOOK} codes")
        if not self.evaluate.clip_model:
            raise ValueError("evaluate.clip_model: missing; text-to-image quality is CLIPScore, from a local CLIP folder")
        if self.evaluate.inception:
            raise ValueError("evaluate.inception must be false for dimoo: prompts have no reference images for FID")


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and the key."""


def _format(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key or '<root>'}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "value_error" and not isinstance(e["input"], dict) else ""))
    return "\n".join(lines)


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def _read_mapping(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        what = "keys" if path.parent.name == CONFIG_DIR else "sections"
        raise ConfigError(f"{path}: expected a mapping of {what} at the top level")
    return raw


def with_config(raw: dict, params_file: str | Path) -> dict:
    """`raw` (params_file's sections) over the config/ files beside params_file, key by key. A
    config file must be named after a section and hold only its keys."""
    folder = Path(params_file).parent / CONFIG_DIR
    for file in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        section = Params.model_fields.get(file.stem)
        if section is None:
            raise ConfigError(f"{file}: no section {file.stem!r}; config/ holds one file per section of "
                              f"{', '.join(Params.model_fields)}")
        settings = _read_mapping(file)
        if unknown := sorted(set(settings) - set(section.annotation.model_fields)):
            raise ConfigError(f"{file}: unknown key {file.stem}.{unknown[0]}")
        if isinstance(raw.get(file.stem, {}), dict):
            raw[file.stem] = settings | raw.get(file.stem, {})
    return raw


def read_raw_params(path: str | Path = "params.yaml") -> dict:
    """The raw mapping that `load_params` validates: params.yaml `with_config`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file (pick a profile: `migm profile default`)")
    return with_config(_read_mapping(path), path)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    folder = path.parent / CONFIG_DIR
    return parse_params(read_raw_params(path), f"{path} (with {folder}/)" if folder.is_dir() else str(path))


_SECTION = re.compile(r"([A-Za-z_]\w*):")
_KEY = re.compile(r"  ([A-Za-z_]\w*):")


def split_profile(text: str) -> dict[str, str]:
    """A profile's text -> {relative path: text}: params.yaml with the `EXPERIMENT` keys, and one
    config/<section>.yaml per section with the rest (keys at the top level). Comment lines stay
    with the key that follows them, a key's own comment and continuation lines with the key."""
    header, sections, pending = [], {}, []  # sections: name -> (lead lines, header line, [(key, lines)])
    for line in text.splitlines():
        if section := _SECTION.match(line):
            name = section[1]
            sections[name], pending = (pending, line, []), []
        elif not sections:
            header.append(line)
        elif key := _KEY.match(line):
            sections[name][2].append((key[1], pending + [line]))
            pending = []
        elif line.startswith("   ") and sections[name][2]:  # a key's value continues
            sections[name][2][-1][1].append(line)
        else:  # a comment or blank line: it belongs to what follows
            pending.append(line)
    params = header + [
        "# params.yaml holds the experiment (the keys sweeps vary); every other setting of a section is",
        "# in config/SECTION.yaml, and a key written here overrides it (`dvc exp run -S +shortcut.heads=4`)."]
    files = {}
    for name, (lead, head, keys) in sections.items():
        kept = EXPERIMENT.get(name, ())
        comment = head.partition("#")[2].strip()
        ours = [line for key, lines in keys if key in kept for line in lines]
        rest = [line.removeprefix("  ") for key, lines in keys if key not in kept for line in lines]
        # Every section stays in params.yaml, empty ones as `{}`: DVC tracks the sections a stage
        # reads there, and a key added to one later (`-S +evaluate.bootstrap=500`) reruns it.
        params += lead + ([head] + ours if ours else [f"{name}: {{}}"])
        if rest:
            intro = [f"# `{name}` settings that the experiment (params.yaml) does not vary; "
                     "params.yaml overrides them."]
            intro += [f"# {comment}"] if comment else []
            files[f"{CONFIG_DIR}/{name}.yaml"] = "\n".join(intro + rest) + "\n"
    return {"params.yaml": "\n".join(params + pending) + "\n", **files}


def use_profile(name: str, dest: str | Path = "params.yaml") -> Path:
    """Validate profile NAME and split it into `dest` (params.yaml) and the config/ folder beside
    it, comments kept; config/ files no profile section writes are removed."""
    src = PROFILES_DIR / f"{name}.yaml"
    if not src.is_file():
        names = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r}; available: {', '.join(names)}")
    expected = load_params(src)
    dest = Path(dest)
    files = split_profile(src.read_text())
    folder = dest.parent / CONFIG_DIR
    folder.mkdir(exist_ok=True)
    for stale in set(folder.glob("*.yaml")) - {dest.parent / f for f in files}:
        stale.unlink()
    for rel, text in files.items():
        (dest if rel == "params.yaml" else dest.parent / rel).write_text(text)
    if load_params(dest) != expected:  # the split must not change a value
        raise ConfigError(f"profiles/{name}.yaml: splitting it into {dest} and {folder}/ changed its values")
    return dest
