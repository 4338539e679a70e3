"""The trajectory store: round trip, resume rules, concurrent and interrupted writers, pair dataset."""

import threading
import uuid

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import default_collate

from migm_shortcut.store import SCHEMA_VERSION, PairDataset, TrajectoryStore, pair_masks

SHAPES = dict(num_samples=10, steps=4, seq_len=5, dim=8, num_tokens=4)
META = {"base": "tiny", "base_hash": "abc123", "rule": {"cfg": 1.0, "tau": 4.5}}


def trajectories(seed: int = 0, n: int = SHAPES["num_samples"]) -> dict[str, np.ndarray]:
    """Smooth random features and a valid order (each position committed at some step)."""
    rng = np.random.default_rng(seed)
    shape = (n, 2, SHAPES["steps"], SHAPES["seq_len"], SHAPES["dim"])
    return {
        "features": np.cumsum(rng.normal(size=shape), axis=2).astype(np.float32),
        "tokens": rng.integers(0, 1024, size=(n, SHAPES["num_tokens"])),
        "order": rng.integers(0, SHAPES["steps"], size=(n, SHAPES["num_tokens"])),
        "labels": rng.integers(0, 10, size=n),
    }


def create(url, unit_size: int = 4, **changes) -> TrajectoryStore:
    return TrajectoryStore.create_or_open(str(url), meta=META, unit_size=unit_size, **{**SHAPES, **changes})


def fill(store: TrajectoryStore, data: dict, units: list[int]) -> None:
    for unit in units:
        rows = store.unit_range(unit)
        store.write_unit(unit, **{k: v[rows.start : rows.stop] for k, v in data.items()})


def assert_same_stores(a: TrajectoryStore, b: TrajectoryStore) -> None:
    for name in ("features", "tokens", "order", "labels"):
        np.testing.assert_array_equal(getattr(a, name)[:], getattr(b, name)[:], err_msg=name)


@pytest.mark.parametrize("dtype, atol", [("float16", 1e-2), ("float32", 0)])
def test_round_trip(tmp_path, dtype, atol):
    data = trajectories()
    store = create(tmp_path / "s.zarr", dtype=dtype)
    assert store.num_units == 3 and store.unit_range(2) == range(8, 10)  # last unit is short
    fill(store, data, [0, 1, 2])
    back = TrajectoryStore.open(str(tmp_path / "s.zarr"))
    assert back.is_complete() and back.meta == META and back.dtype == dtype
    assert (back.num_samples, back.steps, back.seq_len, back.dim, back.num_tokens) == tuple(SHAPES.values())
    assert back.features.dtype == np.dtype(dtype)
    for i in (0, 5, 9):
        item = back.read(i)
        np.testing.assert_allclose(item["features"], data["features"][i], atol=atol, rtol=atol)
        np.testing.assert_array_equal(item["tokens"], data["tokens"][i])
        np.testing.assert_array_equal(item["order"], data["order"][i])
        assert item["labels"] == data["labels"][i]


def test_attributes_and_bad_inputs(tmp_path):
    store = create(tmp_path / "s.zarr")
    attrs = zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs.asdict()
    assert attrs["schema_version"] == SCHEMA_VERSION and attrs["unit_size"] == 4
    with pytest.raises(ValueError, match="bfloat16"):
        create(tmp_path / "bf.zarr", dtype="bfloat16")
    data = trajectories(n=3)
    with pytest.raises(ValueError, match="crosses"):
        store.write_batch(2, **data)  # samples 2..4 span units 0 and 1
    with pytest.raises(FileNotFoundError):
        TrajectoryStore.open(str(tmp_path / "missing.zarr"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w-")  # a foreign zarr group
    with pytest.raises(ValueError, match="schema_version"):
        TrajectoryStore.open(str(tmp_path / "other.zarr"))


def test_reopen_rules(tmp_path):
    url = tmp_path / "s.zarr"
    fill(create(url), trajectories(), [1])
    assert create(url).pending_units() == [0, 2]  # same meta and shapes: resume, data kept
    with pytest.raises(ValueError, match="meta.base_hash"):
        TrajectoryStore.create_or_open(str(url), meta={**META, "base_hash": "other"}, **SHAPES)
    with pytest.raises(ValueError, match="meta.rule.tau"):
        TrajectoryStore.create_or_open(str(url), meta={**META, "rule": {"cfg": 1.0, "tau": 7}}, **SHAPES)
    with pytest.raises(ValueError, match="shapes.steps"):
        create(url, steps=5)
    with pytest.raises(ValueError, match="unit_size"):
        create(url, unit_size=5)
    assert TrajectoryStore.open(str(url)).pending_units() == [0, 2]  # failed reopens deleted nothing


def test_pending_units_shrink(tmp_path):
    store, data = create(tmp_path / "s.zarr", unit_size=2), trajectories()
    assert store.pending_units() == [0, 1, 2, 3, 4]
    assert store.pending_units(0, 2) == [0, 2, 4] and store.pending_units(1, 2) == [1, 3]
    fill(store, data, [2])
    assert store.pending_units() == [0, 1, 3, 4] and store.pending_units(0, 2) == [0, 4]
    fill(store, data, [0, 1, 3, 4])
    assert store.pending_units() == [] and store.is_complete()


def test_two_workers_equal_one_writer(tmp_path):
    data = trajectories()
    single = create(tmp_path / "one.zarr", unit_size=2)
    fill(single, data, single.pending_units())

    def worker(rank: int) -> None:
        store = create(tmp_path / "two.zarr", unit_size=2)  # each worker opens its own handle
        fill(store, data, store.pending_units(rank, 2))

    create(tmp_path / "two.zarr", unit_size=2)  # created once before the workers start
    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shared = TrajectoryStore.open(str(tmp_path / "two.zarr"))
    assert shared.is_complete()
    assert_same_stores(shared, single)


def test_interrupted_unit_is_redone(tmp_path):
    data, junk = trajectories(0), trajectories(1)
    reference = create(tmp_path / "ref.zarr")
    fill(reference, data, [0, 1, 2])
    store = create(tmp_path / "s.zarr")
    fill(store, data, [0, 2])
    store.write_batch(4, **{k: v[4:6] for k, v in junk.items()})  # half of unit 1, then "killed"
    resumed = create(tmp_path / "s.zarr")
    assert resumed.pending_units() == [1] and not resumed.is_complete()
    fill(resumed, data, resumed.pending_units())
    assert resumed.is_complete()
    assert_same_stores(resumed, reference)


def hand_made_store(url: str) -> np.ndarray:
    """One sample, N=4, S=4 (3 image tokens + 1 class slot), D=2; feature value = 10*branch + step."""
    store = TrajectoryStore.create_or_open(
        url, meta={}, num_samples=1, steps=4, seq_len=4, dim=2, num_tokens=3, dtype="float32"
    )
    features = np.zeros((1, 2, 4, 4, 2)) + (10 * np.arange(2)[:, None] + np.arange(4))[None, :, :, None, None]
    order = np.array([[0, 3, 1]])
    store.write_unit(0, features, tokens=np.array([[7, 8, 9]]), order=order, labels=np.array([5]))
    return order[0]


def test_pair_dataset(tmp_path):
    url = str(tmp_path / "s.zarr")
    order = hand_made_store(url)
    ds = PairDataset(url)
    assert len(ds) == 1 * 2 * 3  # samples x branches x (N - unroll)
    item = ds[5]  # branch 1, step 2
    assert item["feature"].shape == (4, 2) and item["targets"].shape == (1, 4, 2)
    assert item["feature"].dtype == torch.float32 and item["tokens"].dtype == torch.long
    assert (item["step"], item["branch"]) == (2, 1)
    assert (item["feature"] == 12).all() and (item["targets"] == 13).all()
    assert item["tokens"].tolist() == [7, 8, 9] and item["order"].tolist() == order.tolist()

    item = PairDataset(url, indices=[0], unroll=2)[1]  # branch 0, step 1
    assert item["targets"].shape == (2, 4, 2) and item["targets"][:, 0, 0].tolist() == [2, 3]

    new, still, ratio = pair_masks(item["order"], 1)
    assert new.tolist() == [False, False, True] and still.tolist() == [False, True, False]
    assert ratio.item() == pytest.approx(1 / 3)
    new, still, ratio = pair_masks(torch.tensor([[0, 3, 1], [-1, 0, 1]]), torch.tensor([0, 1]))
    assert new.tolist() == [[True, False, False], [False, False, True]]
    assert ratio.tolist() == pytest.approx([2 / 3, 0])  # denominator: all L image positions

    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)  # lazy per-worker open
    steps = torch.cat([batch["step"] for batch in loader])
    assert sorted(steps.tolist()) == [0, 0, 1, 1, 2, 2]


def test_store_holds_nothing_run_specific(tmp_path):
    """DVC hashes the store: the same data written twice must give the same bytes (no timestamp)."""
    data = trajectories()
    for name in ("a.zarr", "b.zarr"):
        fill(create(tmp_path / name), data, [0, 1, 2])
    files = sorted(p.relative_to(tmp_path / "a.zarr") for p in (tmp_path / "a.zarr").rglob("*") if p.is_file())
    assert set(zarr.open_group(str(tmp_path / "a.zarr")).attrs) == {"schema_version", "meta", "shapes", "dtype", "unit_size"}
    assert files and all((tmp_path / "a.zarr" / f).read_bytes() == (tmp_path / "b.zarr" / f).read_bytes() for f in files)


def test_pair_dataset_reads_only_the_steps_it_uses(tmp_path, monkeypatch):
    url = str(tmp_path / "s.zarr")
    fill(create(url), trajectories(), [0, 1, 2])
    ds = PairDataset(url, unroll=2)
    reads = []
    original = zarr.AsyncArray.get_orthogonal_selection

    async def logged(self, selection, **kwargs):
        reads.append(selection)
        return await original(self, selection, **kwargs)

    monkeypatch.setattr(zarr.AsyncArray, "get_orthogonal_selection", logged)
    pairs = ds.pairs_per_branch
    items = [3 * 2 * pairs + 1 * pairs + 1, 3 * 2 * pairs + 0]  # sample 3: (branch 1, step 1), (branch 0, step 0)
    batch = ds.__getitems__(items)
    assert sorted(reads) == [(3, 0, [0, 1, 2]), (3, 1, [1, 2, 3])]  # one read per branch, no step it skips
    features = TrajectoryStore.open(url).features
    np.testing.assert_array_equal(batch[0]["targets"].numpy(), features[3, 1, 2:4])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_pair_dataset_in_memory_gives_the_streamed_items(tmp_path, monkeypatch, dtype):
    """Under its memory limit the dataset reads its samples' features once and serves every batch
    from memory, item for item what streaming gives, and its collated `batch` as a DataLoader
    collates the streamed items; one byte over the limit, it streams."""
    url = str(tmp_path / "s.zarr")
    fill(create(url, dtype=dtype), trajectories(), [0, 1, 2])
    indices = [7, 2, 5]  # not in store order: item i of the dataset is sample indices[i]
    size = len(indices) * 2 * SHAPES["steps"] * SHAPES["seq_len"] * SHAPES["dim"] * np.dtype(dtype).itemsize
    assert PairDataset(url, indices, unroll=2, memory_limit=size - 1).features is None
    streamed, held = PairDataset(url, indices, unroll=2), PairDataset(url, indices, unroll=2, memory_limit=size)
    assert held.features.shape == (3, 2, SHAPES["steps"], SHAPES["seq_len"], SHAPES["dim"])

    def no_reads(*args, **kwargs):
        raise AssertionError("a held dataset read the store")

    monkeypatch.setattr(zarr.AsyncArray, "get_orthogonal_selection", no_reads)
    items = [0, 3, 5, 11, 6, 8]  # samples 7 and 5, both branches, steps 0 and 1
    batch, collated = held.__getitems__(items), held.batch(items)
    monkeypatch.undo()
    for a, b in zip(batch, streamed.__getitems__(items), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    expected = default_collate(streamed.__getitems__(items))  # what a DataLoader gives
    assert collated.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(collated[key], expected[key], rtol=0, atol=0)


def test_pair_dataset_refuses_incomplete_units(tmp_path):
    create(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="not complete"):
        PairDataset(str(tmp_path / "s.zarr"), indices=[0])


def test_memory_url():
    fsspec = pytest.importorskip("fsspec", reason="memory:// URLs need fsspec")
    url = f"memory://store-{uuid.uuid4().hex}"
    try:
        order = hand_made_store(url)
        assert TrajectoryStore.open(url).read(0)["order"].tolist() == order.tolist()
        resumed = TrajectoryStore.create_or_open(url, meta={}, num_samples=1, steps=4, seq_len=4, dim=2,
                                                 num_tokens=3, dtype="float32")  # fmt: skip
        assert resumed.is_complete()
        assert PairDataset(url)[0]["targets"].shape == (1, 4, 2)
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)
