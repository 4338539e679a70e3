"""Shortcut training that serves sampling: the distillation loss on the guided distribution, unrolled
training, and validation by chained rollout at the sampler's budgets (tiny base, tiny stores)."""

import copy
import math

import numpy as np
import pytest
import torch
from test_shortcut import tiny_store
from tiny_models import SHORTCUT_SPEC, make_base, make_shortcut, one_thread  # noqa: F401 (autouse fixture)

from migm_shortcut.config import SamplingConfig, ShortcutGrid
from migm_shortcut.extract import extract, open_store
from migm_shortcut.sampling import guided_logits
from migm_shortcut.schedules import SamplingRule, learned_refresh_steps, refresh_steps
from migm_shortcut.shortcut import Shortcut, ShortcutSpec
from migm_shortcut.store import PairDataset, TrajectoryBatchSampler, TrajectoryStore
from migm_shortcut.training import Muon, optimizer
from migm_shortcut.train_shortcut import (
    branch_cond, cond_then_uncond, distillation_kl, measure_placements, rollout_budgets, rollout_errors,
    reuse_error_per_step, rollout_summary, sampled_trajectories, shortcut_loss, shortcut_step,
    stored_trajectories, train_shortcut, validate_rollout, validate_shortcut, validation_summary,
)  # fmt: skip

CPU = torch.device("cpu")
N = 6
RULE = SamplingRule(steps=N, cfg=2.0, tau=4.5)
TRAIN = dict(batch_size=16, pairs_per_trajectory=8, lr_decay_at=10**6, weight_decay=0.0, ema_decay=0.5,
             ema_warmup=0, grad_clip=1.0, num_workers=0, seed=0, device=CPU, progress=False)


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory) -> str:
    """24 real trajectories of the tiny base: 16 to train on, 8 held out."""
    url = str(tmp_path_factory.mktemp("traj") / "t.zarr")
    store = open_store(url, make_base(), RULE, num_samples=24, dtype="float32", unit_size=8, seed=0, num_classes=10)
    extract(store, make_base(), RULE, batch_size=8, progress=False)
    return url


def train(url: str, steps: int = 40, lr: float = 3e-3, unroll: int = 1, **options) -> tuple[Shortcut, list[dict]]:
    log = []
    torch.manual_seed(0)
    model = train_shortcut(Shortcut(ShortcutSpec(**SHORTCUT_SPEC)), make_base(), PairDataset(url, range(16), unroll),
                           steps=steps, lr=lr, rule=RULE, log=lambda step, stats: log.append(stats), log_every=1,
                           **TRAIN, **options)
    return model, log


def first_batch(url: str, unroll: int = 1) -> dict:
    data = PairDataset(url, range(16), unroll)
    items = next(iter(TrajectoryBatchSampler(data, 8, 4, seed=0)))
    return cond_then_uncond(torch.utils.data.default_collate(data.__getitems__(items)))


# the distillation loss


def test_distillation_kl_by_hand():
    true = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    pred = torch.tensor([[0.0, math.log(3)]])  # q = (1/4, 3/4)
    # KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert distillation_kl(true, pred).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # at T = 2 the same q comes from logits twice as far apart, and the T^2 factor scales by 4
    assert distillation_kl(true, 2 * pred, 2.0).item() == pytest.approx(2 * math.log(4 / 3), rel=1e-6)
    assert distillation_kl(pred, pred).item() == pytest.approx(0, abs=1e-7)


def test_guided_logits_follow_the_sampling_rule():
    c, u = torch.randn(2, 3, 5, 7).unbind()
    logits = torch.cat([c, u])
    # step 3 of 6 with w = 2 ramped: w = 2 * 3 / 5
    torch.testing.assert_close(guided_logits(logits, RULE, 3), 2.2 * c - 1.2 * u)
    # one step per pair, and a constant w with the ramp off, at temperature 2
    steps = torch.tensor([0, 5, 0])
    expected = torch.stack([c[0], 3 * c[1] - 2 * u[1], c[2]])
    torch.testing.assert_close(guided_logits(logits, RULE, steps), expected)
    flat = SamplingRule(steps=N, cfg=4.0, ramp=False, temperature=2.0)
    torch.testing.assert_close(guided_logits(logits, flat, steps), (5 * c - 4 * u) / 2)


def test_kl_term_on_the_guided_distribution_of_still_masked_positions(trajectories):
    base, model = make_base(), make_shortcut().requires_grad_(True)
    batch = first_batch(trajectories)
    _, terms = shortcut_loss(model, base, batch, unroll=1, kl_weight=1.0, kl_temperature=2.0, rule=RULE)
    with torch.no_grad():  # by hand, pair by pair
        pred, _ = shortcut_step(model, base, batch["feature"], batch["tokens"], batch["order"], batch["step"],
                                branch_cond(base, batch))
    half = len(pred) // 2
    total, count = 0.0, 0
    for i in range(half):
        s = batch["step"][i].item()
        w = 2.0 * (s + 1) / (N - 1)
        pair = [i, half + i]
        true_c, true_u = base.head(batch["targets"][pair, 0])
        pred_c, pred_u = base.head(pred[pair])
        p = torch.log_softmax(((1 + w) * true_c - w * true_u) / 2, -1)
        q = torch.log_softmax(((1 + w) * pred_c - w * pred_u) / 2, -1)
        still = batch["order"][i] > s
        total += (4 * (p.exp() * (p - q)).sum(-1))[still].sum().item()
        count += still.sum().item()
    assert terms["kl"].item() == pytest.approx(total / count, rel=1e-4)
    loss, mse_only = shortcut_loss(model, base, batch, unroll=1, rule=RULE)
    assert mse_only["kl"] == 0.0 and loss.item() == pytest.approx(terms["mse"].item(), rel=1e-6)



# weighting the steps


def test_reuse_error_per_step_by_hand(trajectories):
    base, store = make_base(), TrajectoryStore.open(trajectories)
    scale = reuse_error_per_step(base, PairDataset(trajectories, range(4)), device=CPU)
    assert scale.shape == (N - 1,)
    for s in (0, N - 2):
        errors = []
        for i in range(4):
            item = store.read(i)
            f = torch.from_numpy(item["features"]).float()  # [2, N, S, D]
            still = torch.from_numpy(item["order"]).long() > s
            for branch in (0, 1):
                err = (f[branch, s + 1] - f[branch, s]).pow(2).mean(-1)[base.image_positions]
                errors.append(err[still].sum().item())
        assert scale[s].item() == pytest.approx(np.mean(errors), rel=1e-5)


def test_step_weighted_loss_divides_each_item_by_its_steps_scale(trajectories):
    base, model = make_base(), make_shortcut().requires_grad_(True)
    batch = first_batch(trajectories)
    scale = torch.arange(1.0, N)  # step s weighs 1 / (s + 1)
    _, terms = shortcut_loss(model, base, batch, unroll=1, step_scale=scale)
    with torch.no_grad():
        pred, mask = shortcut_step(model, base, batch["feature"], batch["tokens"], batch["order"], batch["step"],
                                   branch_cond(base, batch))
    per_item = ((pred - batch["targets"][:, 0]).pow(2).mean(-1) * mask).sum(1) / (batch["step"] + 1)
    assert terms["mse"].item() == pytest.approx(per_item.mean().item(), rel=1e-5)


def test_step_weighted_training_brings_every_step_below_reuse(trajectories):
    model, log = train(trajectories, loss_weighting="step")
    assert all(math.isfinite(s["loss"]) for s in log) and log[-1]["loss"] < log[0]["loss"]
    per_step = validate_shortcut(model, make_base(), PairDataset(trajectories, range(16, 24)), device=CPU)
    assert max(r["mse_ratio"] for r in per_step) < 0.9 and np.mean([r["mse_ratio"] for r in per_step]) < 0.7
    with pytest.raises(ValueError, match="loss_weighting"):
        train(trajectories, steps=1, loss_weighting="steps")


def test_batches_pair_both_branches_of_each_step(trajectories):
    batch = first_batch(trajectories)
    c, u = batch["branch"].chunk(2)
    assert (c == 0).all() and (u == 1).all()
    for key in ("step", "cond", "order"):
        assert torch.equal(*batch[key].chunk(2)), key
    data = PairDataset(trajectories, range(16))
    single = torch.utils.data.default_collate(data.__getitems__([0, 1]))  # two steps of one branch
    with pytest.raises(ValueError, match="both CFG branches"):
        cond_then_uncond(single)


# training


# Muon's updates have the same size whatever the gradient's: the tiny store's first step, whose
# feature barely changes (reuse's error 1e-4), needs more of them to be fitted that finely.
@pytest.mark.parametrize("optimizer_kind, steps", [("adamw", 40), ("muon", 80)])
def test_training_beats_reuse_teacher_forced_and_chained(trajectories, optimizer_kind, steps):
    model, log = train(trajectories, steps, optimizer_kind=optimizer_kind)
    assert len(log) == steps and all(math.isfinite(s["loss"]) for s in log)
    base, store = make_base(), TrajectoryStore.open(trajectories)
    per_step = validate_shortcut(model, base, PairDataset(trajectories, range(16, 24)), device=CPU)
    assert np.mean([r["mse_ratio"] for r in per_step]) < 0.7
    summary = rollout_summary(validate_rollout(model, base, store, range(16, 24), RULE, [2, 3], device=CPU))
    assert summary["rollout_mse_ratio_B2"] < 0.8 and summary["rollout_mse_ratio_B3"] < 0.8
    assert summary["rollout_kl_ratio_B2"] < 1 and summary["rollout_kl_ratio_B3"] < 1


def test_training_on_a_split_held_in_memory_is_streamed_training(trajectories):
    """The same batches in the same order: the same weights, whether the split streams from the
    store through a loader process or is held in memory."""
    models = []
    for memory_limit in (0, 10**9):
        torch.manual_seed(0)
        data = PairDataset(trajectories, range(16), memory_limit=memory_limit)
        assert (data.features is None) == (memory_limit == 0)
        models.append(train_shortcut(Shortcut(ShortcutSpec(**SHORTCUT_SPEC)), make_base(), data, steps=6,
                                     lr=3e-3, rule=RULE, **{**TRAIN, "num_workers": 1}))
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_muon_orthogonalises_the_matrices_and_adamw_steps_the_rest():
    """optimizer "muon": each weight matrix's first update points along the gradient's polar factor
    U V^T (Muon's orthogonalised step), where AdamW's first step is the gradient's sign; every
    parameter steps; a schedule's lr reaches both parts; a saved state resumes to the same weights."""
    def step(model, opt, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()

    def start(kind: str, weights: dict | None = None):
        torch.manual_seed(0)
        model = Shortcut(ShortcutSpec(**SHORTCUT_SPEC))
        if weights is not None:
            model.load_state_dict(weights)
        return model, optimizer(model, kind, lr=1e-2, weight_decay=0.0)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.flatten() @ b.flatten() / a.norm() / b.norm()).item()

    for kind in ("muon", "adamw"):
        model, opt = start(kind)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step(model, opt, 0)
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
        for name, p in model.named_parameters():
            descent = before[name] - p.detach()
            assert descent.abs().sum() > 0, name
            if p.ndim == 2 and min(p.shape) > 1:
                u, _, v = torch.linalg.svd(p.grad, full_matrices=False)
                polar, sign = cosine(descent, u @ v), cosine(descent, p.grad.sign())
                assert (polar > 0.95 and sign < 0.9) if kind == "muon" else (sign > 0.999 and polar < 0.9), name

    model, opt = start("muon")
    torch.optim.lr_scheduler.LambdaLR(opt, lambda update: 0.1)
    assert len(opt.param_groups) == 2 and all(g["lr"] == pytest.approx(1e-3) for g in opt.param_groups)

    model, opt = start("muon")
    step(model, opt, 0)
    saved_weights, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    step(model, opt, 1)
    resumed, fresh = start("muon", saved_weights), start("muon", saved_weights)
    resumed[1].load_state_dict(saved_state)
    for m, o in (resumed, fresh):
        step(m, o, 1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(resumed[0].named_parameters())[name], p, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(fresh[0].parameters(), model.parameters()))


@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", None])
def test_muon_steps_as_torch_muon_does(adjust_lr_fn):
    """training.Muon (matrices of one shape batched, float32 on the CPU) takes torch.optim.Muon's
    steps, up to the bfloat16 rounding of torch's iteration (about 1% of a step here): wide, tall
    and square matrices, two of one shape, weight decay, momentum carried over steps."""
    shapes = [(8, 24), (24, 8), (8, 24), (12, 12), (16, 40)]
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    settings = dict(lr=0.05, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    opts = Muon(ours, **settings), torch.optim.Muon(theirs, **settings)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()
    for a, b, w in zip(ours, theirs, start):
        step = b.detach() - w
        torch.testing.assert_close(a.detach() - w, step, rtol=0, atol=0.03 * step.abs().max().item())
    assert opts[0].state_dict()["state"].keys() == opts[1].state_dict()["state"].keys()


def test_distillation_training_logs_both_terms(trajectories):
    _, log = train(trajectories, steps=3, kl_weight=0.5, kl_temperature=2.0)
    for s in log:
        assert s["loss"] == pytest.approx(s["mse"] + 0.5 * s["kl"], rel=1e-5) and s["kl"] > 0
    with pytest.raises(ValueError, match="rule"):
        train_shortcut(make_shortcut(), make_base(), PairDataset(trajectories), steps=1, lr=1e-3, kl_weight=1.0,
                       **TRAIN)


def test_unrolled_loss_chains_the_predictions(trajectories):
    base, model = make_base(), make_shortcut().requires_grad_(True)
    batch = first_batch(trajectories, unroll=2)
    loss, terms = shortcut_loss(model, base, batch, unroll=2)
    cond = branch_cond(base, batch)
    errors, x = [], batch["feature"]
    for j in range(2):  # step s + j predicted from the previous prediction, not from the true feature
        x, mask = shortcut_step(model, base, x, batch["tokens"], batch["order"], batch["step"] + j, cond)
        err = (x - batch["targets"][:, j]).pow(2).mean(-1)
        errors.append((err * mask).sum() / mask.sum())
    assert loss.item() == pytest.approx((errors[0] + errors[1]).item() / 2, rel=1e-5)


def test_unrolled_training_beats_reuse_in_rollout(trajectories):
    model, log = train(trajectories, unroll=2)
    assert len(log) == 40 and all(math.isfinite(s["loss"]) for s in log)
    rows = validate_rollout(model, make_base(), TrajectoryStore.open(trajectories), range(16, 24), RULE, [2],
                            device=CPU)
    assert rollout_summary(rows)["rollout_mse_ratio_B2"] < 0.8


# chained rollout validation


def test_untrained_shortcut_rolls_out_as_reuse(trajectories):
    rows = validate_rollout(Shortcut(ShortcutSpec(**SHORTCUT_SPEC)), make_base(), TrajectoryStore.open(trajectories),
                            range(16, 24), RULE, [2, 4], device=CPU, batch_size=3)
    # N = 6: B = 2 refreshes at {0, 3}, B = 4 at {0, 2, 3, 4}; the other steps are predicted
    assert sorted({(r["budget"], r["step"]) for r in rows}) == [(2, 1), (2, 2), (2, 4), (2, 5), (4, 1), (4, 5)]
    by = {(r["budget"], r["step"], r["source"]): r for r in rows}
    for budget, step, _ in by:
        assert by[budget, step, "shortcut"]["mse"] == by[budget, step, "reuse"]["mse"]
        assert by[budget, step, "shortcut"]["kl"] == by[budget, step, "reuse"]["kl"]
    summary = rollout_summary(rows)
    assert summary["rollout_mse_ratio_B2"] == 1.0 and summary["rollout_kl_ratio_B4"] == 1.0


def test_rollout_errors_by_hand(tmp_path):
    """N = 4, B = 2: refreshes at {0, 2}; steps 1 and 3 predicted. Reuse keeps f_0 then f_2;
    extrapolation has one refresh at step 1 (so reuses f_0), then f_2 + (f_2 - f_0) / 2 at step 3."""
    url = str(tmp_path / "s.zarr")
    data = tiny_store(url, steps=4, n=4)
    base, rule = make_base(), SamplingRule(steps=4, cfg=1.5)
    rows = validate_rollout(make_shortcut(), base, TrajectoryStore.open(url), range(1, 4), rule, [2], device=CPU)
    f = torch.from_numpy(data["features"][1:])  # [n, 2, N, S, D]
    order = torch.from_numpy(data["order"][1:])
    guesses = {("reuse", 1): f[:, :, 0], ("reuse", 3): f[:, :, 2], ("extrapolate", 1): f[:, :, 0],
               ("extrapolate", 3): f[:, :, 2] + (f[:, :, 2] - f[:, :, 0]) / 2}
    got = {(r["source"], r["step"]): r for r in rows}
    assert set(got) == {(s, t) for s in ("shortcut", "reuse", "extrapolate") for t in (1, 3)}
    for (source, t), guess in guesses.items():
        still = order > t - 1  # [n, L] image positions still masked in state t
        err = (guess - f[:, :, t]).pow(2).mean(-1)[..., 1:]  # [n, 2, L], image positions after the class slot
        assert got[source, t]["mse"] == pytest.approx(err[still[:, None].expand_as(err)].mean().item(), rel=1e-5)
        w = 1.5 * t / 3

        def guided(x):
            c, u = base.head(x[:, 0]), base.head(x[:, 1])
            return torch.log_softmax((1 + w) * c - w * u, -1)

        p, q = guided(f[:, :, t]), guided(guess)
        kl = (p.exp() * (p - q)).sum(-1)
        assert got[source, t]["kl"] == pytest.approx(kl[still].mean().item(), rel=1e-4)
    assert got["shortcut", 1]["mse"] != got["reuse", 1]["mse"]


def test_rollout_budgets_are_the_grid_budgets_below_the_stored_steps():
    grids = [ShortcutGrid(steps=8, budgets=[4, 2, 8]), ShortcutGrid(steps=12, budgets=[3]),
             ShortcutGrid(steps=8, budgets=[2, 5])]
    assert rollout_budgets(grids, 8) == [2, 4, 5]


def test_validation_summary_averages_the_steps():
    per_step = [{"mse_ratio": r, "cosine": 0.9, "reuse_cosine": 0.5} for r in (0.2, 0.4, 0.9)]
    rows = [{"budget": 2, "step": 1, "source": s, "mse": m, "kl": 1.0}
            for s, m in (("shortcut", 1.0), ("reuse", 4.0), ("extrapolate", 2.0))]
    out = validation_summary(per_step, rows, parameters=10, base_parameters=40)
    assert out["val_mse_ratio_mean"] == pytest.approx(0.5) and out["val_mse_ratio_max"] == 0.9
    assert out["val_mse_ratio_last"] == 0.9 and out["val_reuse_cosine_mean"] == pytest.approx(0.5)
    assert out["parameter_fraction_of_base"] == 0.25 and out["rollout_mse_ratio_B2"] == 0.25


# the error of every stretch of shortcut steps, for the learned placement


def test_rollout_errors_are_the_chained_rollout_from_each_start(trajectories):
    store, shortcut = TrajectoryStore.open(trajectories), make_shortcut()
    errors = rollout_errors(shortcut, make_base(), stored_trajectories(store, range(16, 24), make_base(), CPU), RULE)
    rows = validate_rollout(shortcut, make_base(), store, range(16, 24), RULE, [2, 4], device=CPU)
    for r in (r for r in rows if r["source"] == "shortcut"):
        last = max(s for s in refresh_steps(N, r["budget"]) if s < r["step"])
        assert errors["mse"][last][r["step"]] == pytest.approx(r["mse"], rel=1e-5)
        assert errors["kl"][last][r["step"]] == pytest.approx(r["kl"], rel=1e-5)
    assert errors["kl"][3][1] == 0.0 and errors["kl"][0][5] > 0  # only t > s is measured


def test_sampled_trajectories_at_the_stored_n_are_the_stored_ones(trajectories):
    store, base = TrajectoryStore.open(trajectories), make_base()
    labels = torch.as_tensor(store.labels[16:24])
    stored = next(stored_trajectories(store, range(16, 24), base, CPU))
    sampled = next(sampled_trajectories(base, RULE, labels, range(16, 24), store.meta["seed"], CPU))
    for a, b in zip(stored, sampled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_measure_placements_at_each_learned_n(trajectories):
    grids = [ShortcutGrid(steps=N, budgets=[2, 3], placement="learned"), ShortcutGrid(steps=4, budgets=[2]),
             ShortcutGrid(steps=5, budgets=[2], placement="learned")]
    sampling = SamplingConfig(steps=N, cfg=RULE.cfg, tau=RULE.tau)
    out = measure_placements(make_shortcut(), make_base(), TrajectoryStore.open(trajectories), range(16, 20), sampling,
                             grids, CPU)
    assert list(out) == [str(5), str(N)]  # uniform entries need nothing measured
    assert len(out["5"]["kl"]) == 5 and list(out[str(N)]["budgets"]) == ["2", "3"]
    for placed in out.values():
        for budget, b in placed["budgets"].items():
            assert b["learned"] == learned_refresh_steps(placed["kl"], int(budget))
            assert b["uniform"] == refresh_steps(len(placed["kl"]), int(budget))
            assert b["learned_error"] <= b["uniform_error"]

