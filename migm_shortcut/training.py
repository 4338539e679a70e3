"""What the training loops share: EMA weights, the optimizers, the non-finite-loss stop, device
autocast, and the saved training state that lets a killed run resume."""

import copy
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import distributed

Log = Callable[[int, dict], None]


class EMA:
    """Exponential moving average of a model's weights, for the checkpoint.

    The average starts after `warmup` updates (before that it copies the weights): early weights
    are noise, and with a decay sized to the run (an average over about 1/(1 - decay) updates, ~ a
    tenth of them) the average then covers the part of training worth keeping.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: int):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = 0.0 if step <= self.warmup else self.decay
        for ema, live in zip(self.model.state_dict().values(), model.state_dict().values()):
            if ema.is_floating_point():
                ema.lerp_(live, 1 - decay)
            else:
                ema.copy_(live)


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update, computed in fewer, cheaper operations.

    Each matrix's Nesterov momentum is orthogonalised by the quintic Newton-Schulz iteration and
    scaled by `adjust_lr_fn`, after decoupled weight decay, as torch's `step` does; the state
    (`momentum_buffer`) and the param groups are torch's. torch iterates one matrix at a time in
    bfloat16, which a CPU does slowly for small matrices (30% of a shortcut update: BENCHMARKS.md,
    section 4). Here the matrices of one shape iterate together as one batch, in float32 on the CPU
    and bfloat16 on CUDA, where tensor cores make it the fast choice.
    """

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            momentum, by_shape = group["momentum"], {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                by_shape.setdefault(p.shape, []).append((p, update))
            for shape, pairs in by_shape.items():
                ortho = newton_schulz(torch.stack([u for _, u in pairs]), group["ns_coefficients"],
                                      group["ns_steps"], group["eps"])
                lr = group["lr"] * muon_lr_ratio(shape, group["adjust_lr_fn"])
                for (p, _), o in zip(pairs, ortho):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(o.to(p.dtype), alpha=-lr)


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """Matrices g [k, A, B] mapped near their polar factors U V^T: the quintic iteration leaves
    the singular values near 1, not at it (0.68-1.04 for a Gaussian 32 x 128), as Muon intends."""
    a, b, c = coefficients
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = g.shape[-2] > g.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch.optim.Muon's lr factor for a matrix of `shape`: "match_rms_adamw" gives updates of
    AdamW's typical RMS (0.2 sqrt(max(A, B))); "original" (None) Muon's sqrt(max(1, A / B))."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


class MuonAdamW(torch.optim.Optimizer):
    """Muon (`Muon`) on the weight matrices, AdamW on the rest (biases, norm scales):
    Muon orthogonalises each matrix's update, which is defined for matrices only. Its lr is scaled
    to AdamW's update size (`match_rms_adamw`), so one `lr` and one schedule serve both.

    One optimizer to the schedule and the saved state: its param groups are its two parts'.
    """

    def __init__(self, params, lr: float, weight_decay: float):  # no super().__init__: the parts hold it all
        params = list(params)
        matrices, rest = [p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2]
        self.parts = {"muon": Muon(matrices, lr=lr, weight_decay=weight_decay,
                                               adjust_lr_fn="match_rms_adamw"),
                      "adamw": torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay)}
        self.defaults = {"lr": lr, "weight_decay": weight_decay}

    @property
    def param_groups(self) -> list[dict]:  # the parts' own dicts: a schedule's lr reaches them
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for part in self.parts.values() for k, v in part.state.items()}

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])


def optimizer(model: torch.nn.Module, kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer `kind` ("adamw" or "muon": `MuonAdamW`) over `model`'s parameters."""
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if kind == "muon":
        return MuonAdamW(model.parameters(), lr, weight_decay)
    raise ValueError(f"optimizer {kind!r}: one of adamw, muon")


def check_finite(loss: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: loss became {loss.item()} at update {step}; lower the lr or check the data")


def autocast(device: torch.device):
    """bf16 autocast on GPU; plain fp32 on CPU (bf16 gave 5-8% there: BENCHMARKS.md, section 2)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class TrainingState:
    """A training run's full state on disk, so that a killed run resumes where it stopped.

    `resume` registers what the loop trains (modules, optimizer, schedule, generators; the global
    torch random state comes along) and loads a saved state made with the same `fingerprint`;
    `updates` then yields the updates left and saves after one once `minutes` of work have passed
    since the last save, or when SIGTERM came (the process then ends as terminated). The stage
    calls `remove` once its outputs are written. A loop's data position is its update count: its
    data comes from generators saved here or from a sampler told to skip the updates done
    (TrajectoryBatchSampler). A save is atomic (temporary file, fsync, rename): `kill -9` at any
    moment leaves the previous state or the new one. `history` (the logged rows) is saved too, so
    the curves survive a resume. Under data parallelism every rank resumes and rank 0 writes.
    With no `path` nothing is saved or loaded (tests, benchmarks).
    """

    def __init__(self, path: str | Path | None = None, fingerprint: dict | None = None, minutes: float = 10.0,
                 history: list | None = None):
        self.path, self.fingerprint, self.seconds = path and Path(path), fingerprint, minutes * 60
        self.history = [] if history is None else history
        self.parts: dict = {}
        self.start = 0
        self.terminated = False

    def resume(self, **parts) -> int:
        """Register `parts` (objects with state_dict/load_state_dict, or torch.Generator) and load a
        matching saved state into them. Returns the number of updates already done (0: none)."""
        self.parts = parts
        if self.path is None or not self.path.is_file():
            return self.start
        saved = torch.load(self.path, weights_only=True)
        if saved["fingerprint"] != self.fingerprint:
            print(f"{self.path}: made with other params or inputs; ignored, training from scratch")
            return self.start
        for name, part in parts.items():
            if isinstance(part, torch.Generator):
                part.set_state(saved["parts"][name])
            else:
                part.load_state_dict(saved["parts"][name])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.history[:] = saved["history"]
        self.start = saved["step"]
        print(f"{self.path}: resuming after update {self.start}")
        return self.start

    def updates(self, steps: int):
        """Updates start+1..steps; after each one, the state is saved when it is due."""
        catch = self.path is not None and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if catch else None
        last_save = time.monotonic()
        try:
            for step in range(self.start + 1, steps + 1):
                yield step  # the loop's body runs here
                if self.path is not None and (self.terminated or time.monotonic() - last_save >= self.seconds):
                    self._save(step)
                    last_save = time.monotonic()
                if self.terminated:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.raise_signal(signal.SIGTERM)
        finally:
            if catch:
                signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)

    def _save(self, step: int) -> None:
        if not distributed.is_main():
            return
        parts = {name: part.get_state() if isinstance(part, torch.Generator) else part.state_dict()
                 for name, part in self.parts.items()}
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        state = {"fingerprint": self.fingerprint, "step": step, "parts": parts, "rng": torch.get_rng_state(),
                 "cuda_rng": cuda_rng, "history": list(self.history)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def remove(self) -> None:
        """Delete the saved state: the stage's outputs are written, nothing is left to resume."""
        if self.path is not None and distributed.is_main():
            self.path.unlink(missing_ok=True)

    def _on_sigterm(self, signum, frame) -> None:
        self.terminated = True  # saved after the current update: a state mid-update is inconsistent
