"""The Zarr v3 trajectory store: schema, resumable sharded writer, and the training-pair dataset.

Layout (one root group; URL: a local path, `file://...`, `memory://...`, any fsspec URL):

    attrs       schema_version, meta, shapes, dtype, unit_size (nothing run-specific: DVC hashes the store)
    features    [num_samples, 2, N, S, D] float16|float32; branch 0 = cond, 1 = uncond.
                chunk = one step of one branch of one sample (the unit of reading),
                shard = one whole sample (one object/file per trajectory).
    tokens      [num_samples, L] int32, final image tokens     shard = one work unit, chunk = 1 sample
    order       [num_samples, L] int16, step that committed each position (-1: never masked); idem
    labels      [num_samples] int64, class id                  chunk = one work unit
                or [num_samples, P] int64, padded prompt token ids (text-to-image bases; shapes.cond_len = P)
    unit_done   [num_units] uint8, chunk = 1: a unit's completion flag, set after its data

A work unit is `unit_size` consecutive samples. Every chunk or shard of every array belongs to exactly
one unit, so processes or machines can fill disjoint units of one store concurrently without any lock,
and a unit killed mid-way is redone by overwriting the same objects (no duplicates, no corruption).
"""

import asyncio
import itertools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

SCHEMA_VERSION = 1
DTYPES = ("float16", "float32")
# Byte shuffle + zstd level 1: level 3 encoded 3x slower for about 5% smaller files.
_COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
_SHAPE_KEYS = ("num_samples", "steps", "seq_len", "dim", "num_tokens")
# zarr encodes/decodes a shard's inner chunks in batches of this many (default 1; read per call).
# 64 made whole-trajectory writes 1.75x (with write_empty_chunks) and reads 1.4x faster here.
_WHOLE_SHARDS = {"codec_pipeline.batch_size": 64}


def _plain(x: Any) -> np.ndarray:
    """numpy view of a tensor or array (bf16 tensors go through float32, which holds them exactly)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _first_difference(stored: dict, wanted: dict, prefix: str = "") -> str | None:
    """Dotted name of the first key whose value differs between two JSON trees, else None."""
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if (found := _first_difference(a, b, f"{prefix}{key}.")) is not None:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def _check_schema(attrs: dict, url: str) -> None:
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{url}: schema_version {attrs.get('schema_version')!r} != {SCHEMA_VERSION} "
            "(not a trajectory store of this version, or its creation was interrupted)"
        )


class TrajectoryStore:
    """A store of sampler trajectories; get one with `create_or_open` (writers) or `open` (readers)."""

    def __init__(self, group: zarr.Group) -> None:
        attrs = group.attrs.asdict()
        _check_schema(attrs, str(group.store))
        self.meta: dict = attrs["meta"]
        shapes = attrs["shapes"]
        self.num_samples: int = shapes["num_samples"]
        self.steps: int = shapes["steps"]
        self.seq_len: int = shapes["seq_len"]
        self.dim: int = shapes["dim"]
        self.num_tokens: int = shapes["num_tokens"]
        self.dtype: str = attrs["dtype"]
        self.unit_size: int = attrs["unit_size"]
        self.num_units: int = math.ceil(self.num_samples / self.unit_size)
        # Write every chunk as is: zarr's default first compares each one with the fill value.
        self.features = group["features"].with_config({"write_empty_chunks": True})
        self.tokens = group["tokens"]
        self.order = group["order"]
        self.labels = group["labels"]  # the condition: class ids [n], or prompt ids [n, P]
        self._done = group["unit_done"]

    @classmethod
    def create_or_open(
        cls,
        url: str,
        *,
        meta: dict,
        num_samples: int,
        steps: int,
        seq_len: int,
        dim: int,
        num_tokens: int,
        dtype: str = "float16",
        unit_size: int = 256,
        cond_len: int | None = None,
    ) -> "TrajectoryStore":
        """Create the store, or reopen it to resume if it holds the same meta, shapes and layout.

        Raises ValueError naming the first differing key (e.g. `meta.base_id`, `shapes.steps`)
        when an existing store differs: data is never deleted here. Create the store once (e.g. in
        the launcher) before starting concurrent writers; creation itself is not safe to race.
        cond_len: store conditions of P prompt token ids instead of one class id per sample.
        """
        if dtype not in DTYPES:
            raise ValueError(
                f"dtype must be one of {DTYPES}, got {dtype!r} (bfloat16 is no numpy dtype: "
                "use float32, which holds bf16 values exactly, or float16)"
            )
        wanted = {
            "meta": json.loads(json.dumps(meta)),  # compare as stored: tuples become lists, etc.
            "shapes": dict(zip(_SHAPE_KEYS, (num_samples, steps, seq_len, dim, num_tokens)))
            | ({"cond_len": cond_len} if cond_len is not None else {}),  # class-label stores keep their layout
            "dtype": dtype,
            "unit_size": unit_size,
        }
        try:
            group = zarr.open_group(url, mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return cls(cls._create(url, wanted))
        stored = group.attrs.asdict()
        _check_schema(stored, url)
        stored = {key: stored.get(key) for key in wanted}
        if (key := _first_difference(stored, wanted)) is not None:
            raise ValueError(f"existing store at {url} differs in {key!r}; use another URL or delete it")
        return cls(group)

    @staticmethod
    def _create(url: str, wanted: dict) -> zarr.Group:
        shapes = wanted["shapes"]
        n, unit = shapes["num_samples"], wanted["unit_size"]
        steps, seq, dim, length = shapes["steps"], shapes["seq_len"], shapes["dim"], shapes["num_tokens"]
        # mode "w-" refuses a location that already holds anything, so nothing foreign is overwritten.
        group = zarr.open_group(url, mode="w-")
        group.create_array(
            "features", shape=(n, 2, steps, seq, dim), dtype=wanted["dtype"],
            chunks=(1, 1, 1, seq, dim), shards=(1, 2, steps, seq, dim), compressors=_COMPRESSOR,
        )  # fmt: skip
        for name, dtype in (("tokens", "int32"), ("order", "int16")):
            group.create_array(
                name, shape=(n, length), dtype=dtype, chunks=(1, length), shards=(unit, length),
                compressors=_COMPRESSOR,
            )  # fmt: skip
        cond = (shapes["cond_len"],) if "cond_len" in shapes else ()
        group.create_array("labels", shape=(n, *cond), dtype="int64", chunks=(unit, *cond), compressors=_COMPRESSOR)
        group.create_array("unit_done", shape=(math.ceil(n / unit),), dtype="uint8", chunks=(1,), fill_value=0)
        # Attributes last: a store without schema_version is one whose creation did not finish.
        group.attrs.update({"schema_version": SCHEMA_VERSION, **wanted})
        return group

    @classmethod
    def open(cls, url: str) -> "TrajectoryStore":
        """Open an existing store for reading (writes through it fail)."""
        try:
            group = zarr.open_group(url, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise FileNotFoundError(f"no trajectory store at {url}") from err
        return cls(group)

    def unit_range(self, unit: int) -> range:
        """Sample indices of a work unit (the last unit may be short)."""
        if not 0 <= unit < self.num_units:
            raise IndexError(f"unit {unit} not in [0, {self.num_units})")
        return range(unit * self.unit_size, min((unit + 1) * self.unit_size, self.num_samples))

    def pending_units(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Units not yet done among those assigned round-robin to `worker` of `num_workers`."""
        done = self._done[:]
        return [u for u in range(worker, self.num_units, num_workers) if not done[u]]

    def write_batch(self, start: int, features: Any, tokens: Any, order: Any, labels: Any) -> None:
        """Write samples start..start+B-1, which must lie inside one unit (a unit owns its chunks).

        One writer per unit: a unit's tokens/order shard is read, merged and rewritten per batch.

        features [B, 2, N, S, D], tokens [B, L], order [B, L], labels [B] (or prompts [B, P]); numpy
        arrays or tensors.
        """
        features = _plain(features).astype(self.dtype)
        count = len(features)
        unit = start // self.unit_size
        if count == 0 or start + count > self.unit_range(unit).stop:
            raise ValueError(f"batch {start}..{start + count - 1} is empty or crosses the end of unit {unit}")
        if features.shape[1:] != self.features.shape[1:]:
            raise ValueError(f"features shape {features.shape[1:]} != {self.features.shape[1:]} per sample")
        if not np.isfinite(features).all():
            raise ValueError(f"features of samples {start}.. are not finite in {self.dtype} (overflow?)")
        rows = slice(start, start + count)
        with zarr.config.set(_WHOLE_SHARDS):
            self.features[rows] = features
        self.tokens[rows] = _plain(tokens).astype("int32").reshape(count, self.num_tokens)
        self.order[rows] = _plain(order).astype("int16").reshape(count, self.num_tokens)
        self.labels[rows] = _plain(labels).astype("int64").reshape(count, *self.labels.shape[1:])

    def mark_done(self, unit: int) -> None:
        """Record a unit as complete; call only after all of its samples are written."""
        self.unit_range(unit)  # bounds check
        self._done[unit] = 1

    def write_unit(self, unit: int, features: Any, tokens: Any, order: Any, labels: Any) -> None:
        """Write a whole unit's arrays, then mark it done."""
        samples = self.unit_range(unit)
        if len(features) != len(samples):
            raise ValueError(f"unit {unit} holds {len(samples)} samples, got {len(features)}")
        self.write_batch(samples.start, features, tokens, order, labels)
        self.mark_done(unit)

    def is_complete(self) -> bool:
        return bool(self._done[:].all())

    def read(self, index: int) -> dict[str, Any]:
        """One trajectory: features [2, N, S, D] (stored dtype), tokens [L], order [L], labels (an int,
        or the prompt ids [P])."""
        with zarr.config.set(_WHOLE_SHARDS):
            features = self.features[index]
        return {
            "features": features,
            "tokens": self.tokens[index],
            "order": self.order[index],
            "labels": int(self.labels[index]) if self.labels.ndim == 1 else self.labels[index],
        }


def store_bytes(url: str) -> int:
    """Bytes the store at `url` takes (any fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.du(path)


def remove_store(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(path, recursive=True)


def pair_masks(order: torch.Tensor, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks of the training pair (f_step -> f_step+1) from the generation order.

    order [..., L] over image positions only; step an int or a tensor of the leading shape.
    new_mask = order == step: tokens committed at `step` (the shortcut's new-token input).
    next_masked = order > step: positions still masked in state step+1 (MaskGIT's loss positions).
    next_ratio = next_masked.sum / L: the mask ratio of the state being predicted (SPEC section 3).
    The denominator is all L image positions: MaskGIT starts fully masked, so order == -1 never
    occurs there, and a position that was never masked is simply not masked (numerator 0).
    """
    step = torch.as_tensor(step, device=order.device).unsqueeze(-1)
    next_masked = order > step
    return order == step, next_masked, next_masked.float().mean(-1)


class PairDataset(torch.utils.data.Dataset):
    """Training items (sample, branch, s) for s = 0..N-1-unroll, streamed from a store.

    Item: feature f_s [S, D] float32, targets f_{s+1..s+unroll} [unroll, S, D] float32, tokens [L],
    order [L], cond (the stored condition: class id, or prompt ids [P]), step s and branch (all
    long). Features stream: each item reads only steps s..s+unroll of one branch, through a store
    opened lazily in each DataLoader worker. Tokens and order of the chosen samples (6 bytes per
    image position against 4*N*D bytes of fp16 features) are read once here: every zarr read costs
    about 1-2 ms of CPU however small it is.

    memory_limit: when the chosen samples' features take at most this many bytes (stored dtype),
    they are read here once, whole shards at a time, and items come from memory: zarr's cost per
    read, not the model, bounds streamed training on a small base (BENCHMARKS.md, section 4).
    """

    def __init__(self, url: str, indices: Sequence[int] | None = None, unroll: int = 1,
                 memory_limit: int = 0) -> None:
        store = TrajectoryStore.open(url)
        self.url = url
        self.indices = list(range(store.num_samples) if indices is None else indices)
        if not 1 <= unroll < store.steps:
            raise ValueError(f"unroll must be in [1, {store.steps - 1}], got {unroll}")
        self.unroll = unroll
        self.pairs_per_branch = store.steps - unroll
        done = store._done[:]
        # An unfinished unit's samples would read as zeros: refuse rather than train on them.
        if missing := sorted({i // store.unit_size for i in self.indices if not done[i // store.unit_size]}):
            raise ValueError(f"units {missing} of {url} are not complete")
        self.tokens = store.tokens.get_orthogonal_selection((self.indices, slice(None)))
        self.order = store.order.get_orthogonal_selection((self.indices, slice(None)))
        self.cond = store.labels.get_orthogonal_selection((self.indices, *[slice(None)] * (store.labels.ndim - 1)))
        self._store: TrajectoryStore | None = None  # opened per process, see __getitems__
        self._pid = os.getpid()
        self.features: np.ndarray | None = None  # [samples, 2, N, S, D] when held in memory
        if store.features.nbytes // store.num_samples * len(self.indices) <= memory_limit:
            with zarr.config.set(_WHOLE_SHARDS):
                self.features = store.features.get_orthogonal_selection((self.indices, *[slice(None)] * 4))

    def __len__(self) -> int:
        return len(self.indices) * 2 * self.pairs_per_branch

    def __getstate__(self) -> dict:
        # Workers open their own store: never ship an open one across processes.
        return {**self.__dict__, "_store": None}

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[int]) -> list[dict[str, torch.Tensor]]:
        """A batch of items (DataLoader calls this when batching is on).

        Streamed, the batch's reads go to zarr as one concurrent request, which spreads zarr's
        per-call overhead (it, not decoding, bounds reading here).
        """
        keys = []
        for item in items:
            sample, rest = divmod(item, 2 * self.pairs_per_branch)
            keys.append((sample, *divmod(rest, self.pairs_per_branch)))
        # One read per (trajectory, branch) of exactly the steps its pairs use: a batch drawn from a
        # few trajectories (see TrajectoryBatchSampler) costs a few reads, not one per pair.
        wanted: dict[tuple[int, int], set[int]] = {}
        for sample, branch, step in keys:
            wanted.setdefault((sample, branch), set()).update(range(step, step + self.unroll + 1))
        steps = {key: sorted(used) for key, used in wanted.items()}
        reads = dict(zip(steps, self._read(steps)))
        windows = []
        for sample, branch, step in keys:
            first = steps[sample, branch].index(step)  # steps step..step+unroll follow it in the sorted list
            windows.append(reads[sample, branch][first : first + self.unroll + 1])

        batch = []
        for (sample, branch, step), window in zip(keys, windows):
            window = torch.from_numpy(window).float()
            batch.append({
                "feature": window[0],
                "targets": window[1:],
                "tokens": torch.from_numpy(self.tokens[sample]).long(),
                "order": torch.from_numpy(self.order[sample]).long(),
                "cond": torch.as_tensor(self.cond[sample]).long(),
                "step": torch.tensor(step),
                "branch": torch.tensor(branch),
            })  # fmt: skip
        return batch

    def batch(self, items: list[int]) -> dict[str, torch.Tensor]:
        """The batch of `items` as a DataLoader collates it, from the features held in memory: a
        few array copies, where collating items one by one was 14% of a shortcut update
        (BENCHMARKS.md, section 4). Streamed datasets batch through a DataLoader."""
        if self.features is None:
            raise ValueError(f"{self.url}: batch() serves a split held in memory; this one streams")
        sample, rest = np.divmod(np.asarray(items, dtype=np.int64), 2 * self.pairs_per_branch)
        branch, step = np.divmod(rest, self.pairs_per_branch)
        later = step[:, None] + np.arange(1, self.unroll + 1)
        return {
            "feature": torch.from_numpy(self.features[sample, branch, step]).float(),
            "targets": torch.from_numpy(self.features[sample[:, None], branch[:, None], later]).float(),
            "tokens": torch.from_numpy(self.tokens[sample]).long(),
            "order": torch.from_numpy(self.order[sample]).long(),
            "cond": torch.as_tensor(self.cond[sample]).long(),
            "step": torch.from_numpy(step),
            "branch": torch.from_numpy(branch),
        }  # fmt: skip

    def _read(self, steps: dict[tuple[int, int], list[int]]) -> list[np.ndarray]:
        """The features [len(used), S, D] of each (sample, branch): used of `steps`."""
        if self.features is not None:
            return [self.features[sample, branch, used] for (sample, branch), used in steps.items()]
        if self._store is None or self._pid != os.getpid():  # forked workers inherit no usable store
            self._store, self._pid = TrajectoryStore.open(self.url), os.getpid()
        features = self._store.features.async_array

        async def fetch() -> list[np.ndarray]:
            return await asyncio.gather(*(
                features.get_orthogonal_selection((self.indices[sample], branch, used))
                for (sample, branch), used in steps.items()
            ))  # fmt: skip

        return sync(fetch())


class TrajectoryBatchSampler(torch.utils.data.Sampler):
    """Batches of PairDataset items drawn from a few trajectories at a time.

    Each batch takes `pairs_per_trajectory` items from each of batch_size / pairs_per_trajectory
    trajectories: half as many random steps, each with both CFG branches, side by side (cond, then
    uncond), so a loss on the guided distribution sees both branches of a step. Trajectories come
    in a fresh random order every epoch. Reading is then a few whole-trajectory reads per batch
    instead of one read per pair, which is what makes streaming from the store fast enough to train on.

    Data-parallel: every rank draws the same global batches (same seed) and takes its contiguous
    slice `rank` of `world_size` of each, so the global batch, not the per-rank one, is batch_size;
    every slice holds whole (cond, uncond) pairs.

    skip: batches already trained on (a resumed run): they are drawn again, without reading any
    data, so the batches that follow are those an uninterrupted run would see.
    """

    def __init__(self, dataset: PairDataset, batch_size: int, pairs_per_trajectory: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, skip: int = 0) -> None:
        if not 0 <= rank < world_size or batch_size % (2 * world_size):
            raise ValueError(f"need 0 <= rank={rank} < world_size={world_size} and batch_size={batch_size} "
                             "a multiple of 2 * world_size (each rank takes whole cond/uncond pairs)")
        self.steps = dataset.pairs_per_branch
        self.pairs = 2 * self.steps
        self.per = max(2, min(pairs_per_trajectory, self.pairs, batch_size) // 2 * 2)
        self.num_samples, self.batch_size = len(dataset.indices), batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.part = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.skip = skip

    def __len__(self) -> int:
        return self.num_samples // -(-self.batch_size // self.per)

    def __iter__(self):
        while self.skip >= len(self) > 0:  # whole epochs already trained on
            self.skip -= len(self)
            for _ in self._epoch():
                pass
        skip, self.skip = self.skip, 0
        yield from itertools.islice(self._epoch(), skip, None)

    def _epoch(self):
        per_batch = -(-self.batch_size // self.per)  # trajectories per batch
        order = torch.randperm(self.num_samples, generator=self.generator).tolist()
        for first in range(0, len(self) * per_batch, per_batch):
            items = []
            for sample in order[first : first + per_batch]:
                steps = torch.randperm(self.steps, generator=self.generator)[: self.per // 2]
                items += torch.stack([steps, steps + self.steps], 1).add(sample * self.pairs).flatten().tolist()
            yield items[: self.batch_size][self.part]
