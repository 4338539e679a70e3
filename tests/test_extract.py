"""Trajectory extraction (SPEC section 5) of a tiny random base into Zarr: split, resume, pairs."""

import numpy as np
import pytest
import torch
from tiny_models import make_base, make_shortcut, one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut.extract import extract, labels_for, open_or_replace_store, open_store, store_metrics
from migm_shortcut.sampling import FeatureSource, Learned, generate
from migm_shortcut.schedules import SamplingRule
from migm_shortcut.store import PairDataset, TrajectoryStore, pair_masks
from migm_shortcut.train_shortcut import shortcut_step

N, NUM, UNIT, SEED = 4, 6, 2, 3
RULE = SamplingRule(steps=N, cfg=1.0, tau=4.5)


@pytest.fixture(scope="module")
def base():
    return make_base()


def new_store(url, base, dtype="float32", **changes) -> TrajectoryStore:
    kwargs = dict(num_samples=NUM, dtype=dtype, unit_size=UNIT, seed=SEED, num_classes=10)
    return open_store(str(url), base, changes.pop("rule", RULE), **{**kwargs, **changes})


def assert_same(a: TrajectoryStore, b: TrajectoryStore) -> None:
    for name in ("features", "tokens", "order", "labels"):
        np.testing.assert_array_equal(getattr(a, name)[:], getattr(b, name)[:], err_msg=name)


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> TrajectoryStore:
    """One worker, the whole store, float32 (so stores can be compared exactly)."""
    url = tmp_path_factory.mktemp("ref") / "ref.zarr"
    store = new_store(url, base)
    store.test_url = str(url)
    stats = extract(store, base, RULE, batch_size=2, progress=False)
    assert stats["samples_written"] == NUM and stats["units_written"] == 3
    assert store.is_complete()
    return store


def test_store_content(base, reference):
    S, D, L = base.seq_len, base.dim, base.num_tokens
    assert reference.features.shape == (NUM, 2, N, S, D)
    np.testing.assert_array_equal(reference.labels[:], np.arange(NUM) % 10)
    order = reference.order[:]
    assert order.min() == 0 and order.max() == N - 1
    assert (reference.tokens[:] < base.codebook_size).all()
    assert reference.meta["seed"] == SEED and reference.meta["base_id"] == base.base_id
    assert reference.meta["rule"]["steps"] == N
    # features are real: no unwritten (zero) chunk, and they change over the steps
    f = reference.features[:]
    assert (np.abs(f).reshape(NUM, 2, N, -1).max(-1) > 0).all()
    assert not np.allclose(f[:, :, 0], f[:, :, -1])
    assert L == reference.num_tokens


def test_two_workers_equal_one(base, reference, tmp_path):
    store = new_store(tmp_path / "split.zarr", base)  # created once, before the workers
    stats0 = extract(store, base, RULE, batch_size=2, worker=0, num_workers=2, progress=False)
    assert stats0["units_written"] == 2 and stats0["samples_written"] == 4  # units 0 and 2
    assert not store.is_complete() and store.pending_units() == [1]
    assert store.pending_units(0, 2) == []
    # a worker reopening the same store (another process) resumes it rather than recreating it
    other = new_store(tmp_path / "split.zarr", base)
    stats1 = extract(other, base, RULE, batch_size=2, worker=1, num_workers=2, progress=False)
    assert stats1["units_written"] == 1 and stats1["samples_written"] == 2
    assert other.is_complete()
    assert_same(TrajectoryStore.open(str(tmp_path / "split.zarr")), reference)


def test_batch_size_does_not_change_tokens(base, reference, tmp_path):
    store = new_store(tmp_path / "b1.zarr", base)
    extract(store, base, RULE, batch_size=1, progress=False)
    for name in ("tokens", "order", "labels"):
        np.testing.assert_array_equal(getattr(store, name)[:], getattr(reference, name)[:], err_msg=name)
    np.testing.assert_allclose(store.features[:], reference.features[:], rtol=1e-5, atol=1e-5)


class Interrupted(RuntimeError):
    pass


def fail_on_call(store: TrajectoryStore, method: str, call: int) -> None:
    """Make store.<method> raise on its `call`-th call (1-based), as if the process were killed there."""
    original, count = getattr(store, method), [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            raise Interrupted(f"killed in {method} call {call}")
        return original(*args, **kwargs)

    setattr(store, method, wrapper)


@pytest.mark.parametrize("method, call, pending", [
    ("write_batch", 4, [1, 2]),  # killed in the middle of unit 1 (sample 2 written, sample 3 not)
    ("write_batch", 1, [0, 1, 2]),  # killed before anything was written
    ("mark_done", 2, [1, 2]),  # unit 1 fully written but not marked: it is redone
    ("mark_done", 3, [2]),  # killed at the very end
])  # fmt: skip
def test_resume_after_interruption(base, reference, tmp_path, method, call, pending):
    url = tmp_path / "resume.zarr"
    store = new_store(url, base)
    fail_on_call(store, method, call)
    with pytest.raises(Interrupted):
        extract(store, base, RULE, batch_size=1, progress=False)
    resumed = new_store(url, base)  # a new process reopens the store
    assert resumed.pending_units() == pending
    stats = extract(resumed, base, RULE, batch_size=1, progress=False)
    assert stats["units_written"] == len(pending)
    assert stats["samples_written"] == sum(len(resumed.unit_range(u)) for u in pending)
    assert resumed.is_complete()
    assert_same(TrajectoryStore.open(str(url)), reference)
    # a further run finds nothing to do
    assert extract(resumed, base, RULE, batch_size=1, progress=False)["samples_written"] == 0


def test_resume_refuses_a_different_configuration(base, tmp_path):
    url = tmp_path / "conf.zarr"
    new_store(url, base)
    with pytest.raises(ValueError, match="meta.seed"):
        new_store(url, base, seed=SEED + 1)
    with pytest.raises(ValueError, match="meta.rule.tau"):
        new_store(url, base, rule=SamplingRule(steps=N, cfg=1.0, tau=7.0))
    with pytest.raises(ValueError, match="shapes.num_samples"):
        new_store(url, base, num_samples=NUM + 2)


# (c) the pair dataset reproduces the sampler's trajectories and masks


def recorded(base, ids: range):
    """The vanilla trajectories of samples `ids`, generated as extraction does (one unit per batch)."""
    outs = [generate(base, RULE, labels_for(range(a, a + UNIT), 10), list(range(a, a + UNIT)), SEED, record=True)
            for a in range(ids.start, ids.stop, UNIT)]  # fmt: skip
    return (torch.cat([o.features for o in outs]), torch.cat([o.tokens for o in outs]),
            torch.cat([o.order for o in outs]))  # fmt: skip


@pytest.fixture(scope="module")
def fp16_store(base, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("fp16") / "fp16.zarr")
    extract(new_store(url, base, dtype="float16"), base, RULE, batch_size=2, progress=False)
    return url


def test_a_store_of_another_configuration_is_replaced_and_the_same_one_resumed(base, tmp_path):
    url, options = tmp_path / "store.zarr", dict(num_samples=NUM, dtype="float32", unit_size=UNIT,
                                                 seed=SEED, num_classes=10)
    new_store(url, base, rule=SamplingRule(steps=N + 1, cfg=1.0, tau=4.5))
    store = open_or_replace_store(url, base, RULE, **options)
    assert store.steps == N and len(store.pending_units(0, 1)) == 3
    extract(store, base, RULE, batch_size=2, progress=False)
    assert open_or_replace_store(url, base, RULE, **options).is_complete()  # kept, not replaced


def test_pair_dataset_round_trip(base, fp16_store):
    features, tokens, order = recorded(base, range(NUM))
    data = PairDataset(fp16_store)
    pairs = N - 1
    assert len(data) == NUM * 2 * pairs
    for item in range(len(data)):
        sample, rest = divmod(item, 2 * pairs)
        branch, step = divmod(rest, pairs)
        x = data[item]
        assert (x["step"].item(), x["branch"].item()) == (step, branch)
        assert x["feature"].dtype == torch.float32 and x["targets"].shape == (1, base.seq_len, base.dim)
        torch.testing.assert_close(x["feature"], features[sample, branch, step], rtol=1e-3, atol=4e-3)
        torch.testing.assert_close(x["targets"][0], features[sample, branch, step + 1], rtol=1e-3, atol=4e-3)
        assert torch.equal(x["tokens"], tokens[sample]) and torch.equal(x["order"], order[sample])


def test_pair_dataset_subset_unroll_and_loader(base, fp16_store):
    features, tokens, order = recorded(base, range(NUM))
    data = PairDataset(fp16_store, indices=[4, 1], unroll=2)
    assert len(data) == 2 * 2 * (N - 2)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=len(data))))  # the batched read path
    assert batch["targets"].shape == (len(data), 2, base.seq_len, base.dim)
    for j in range(len(data)):
        sample = [4, 1][j // (2 * (N - 2))]
        b, s = batch["branch"][j].item(), batch["step"][j].item()
        torch.testing.assert_close(batch["feature"][j], features[sample, b, s], rtol=1e-3, atol=4e-3)
        torch.testing.assert_close(batch["targets"][j], features[sample, b, s + 1 : s + 3], rtol=1e-3, atol=4e-3)
        assert torch.equal(batch["tokens"][j], tokens[sample]) and torch.equal(batch["order"][j], order[sample])
    with pytest.raises(ValueError, match="unroll"):
        PairDataset(fp16_store, unroll=N)


class Spy(FeatureSource):
    """Recomputes the base's feature at every 'shortcut' step (so the trajectory stays vanilla) and
    keeps what the sampler handed to the feature source."""

    def __init__(self, base, both):
        self.base, self.both, self.states = base, both, []

    def predict(self, state):
        self.states.append(state)
        return self.base.features(torch.cat([state.tokens, state.tokens]), self.both)


def test_pair_masks_match_the_sampler(base, reference):
    tokens, order = torch.from_numpy(reference.tokens[:]).long(), torch.from_numpy(reference.order[:]).long()
    for a in range(0, NUM, UNIT):
        labels = labels_for(range(a, a + UNIT), 10)
        spy = Spy(base, torch.cat([labels, base.uncond(labels)]))
        out = generate(base, RULE, labels, list(range(a, a + UNIT)), SEED, budget=1, source=spy)
        rows = slice(a, a + UNIT)
        assert torch.equal(out.tokens, tokens[rows]) and torch.equal(out.order, order[rows])  # still vanilla
        assert [s.step for s in spy.states] == list(range(1, N))
        for state in spy.states:
            # the pair (f_{s}, f_{s+1}) with s = step - 1, as training derives it from the stored order
            new_mask, next_masked, next_ratio = pair_masks(order[rows], state.step - 1)
            handed = torch.zeros_like(new_mask).scatter_(1, state.new_positions[:UNIT], True)
            assert torch.equal(handed, new_mask)
            assert torch.equal(state.new_positions[UNIT:], state.new_positions[:UNIT])
            torch.testing.assert_close(state.mask_ratio, torch.cat([next_ratio, next_ratio]))
            current = state.tokens
            assert torch.equal(current == base.mask_id, next_masked)
            assert torch.equal(current[new_mask], tokens[rows][new_mask])  # new ids = final ids there


def test_training_prediction_equals_sampler_prediction(base, reference):
    """The shortcut sees the same inputs in training (teacher forcing from the store) as in sampling."""
    shortcut = make_shortcut()
    outputs = []
    hook = shortcut.register_forward_hook(lambda m, args, out: outputs.append(out.clone()))
    try:
        labels = labels_for(range(0, UNIT), 10)
        generate(base, RULE, labels, list(range(UNIT)), SEED, budget=2, source=Learned(shortcut, base))  # full [0, 2]
    finally:
        hook.remove()
    sampler_f1 = outputs[0]  # step 1 from the true f_0 and the tokens committed at step 0 (as vanilla)
    data = PairDataset(reference.test_url, indices=[0, 1])
    for sample in range(UNIT):
        for branch in range(2):
            x = data[sample * 2 * (N - 1) + branch * (N - 1) + 0]
            with torch.no_grad():
                pred, loss_mask = shortcut_step(shortcut, base, x["feature"][None], x["tokens"][None],
                                                x["order"][None], x["step"][None])
            torch.testing.assert_close(pred[0], sampler_f1[branch * UNIT + sample], rtol=1e-5, atol=1e-5)
            # the loss covers exactly the image positions still masked in state 1
            assert not loss_mask[0, 0]
            assert torch.equal(loss_mask[0, 1:], x["order"] > 0)


def test_store_metrics_rate_counts_only_what_this_run_wrote():
    stats = {"samples_written": 25, "units_written": 5, "seconds": 2.0, "samples_per_second": 12.5}
    metrics = store_metrics(stats, num_samples=100, store_bytes=8 * 2**20, workers=3)
    # 8 MB for 100 samples, 25 of them written in 2 s: 2 MB in 2 s
    assert metrics == {"num_samples": 100, "store_megabytes": 8.0, **stats,
                       "write_megabytes_per_second": 1.0, "workers": 3}
    idle = {**stats, "samples_written": 0, "seconds": 0.0}
    assert store_metrics(idle, num_samples=100, store_bytes=8 * 2**20, workers=1)["write_megabytes_per_second"] == 0
