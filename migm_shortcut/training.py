"""What the training loops share: EMA weights, the non-finite-loss stop, device autocast."""

import copy
from collections.abc import Callable

import torch

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


def check_finite(loss: torch.Tensor, step: int, what: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: loss became {loss.item()} at update {step}; lower the lr or check the data")


def autocast(device: torch.device):
    """bf16 autocast on GPU; plain fp32 on CPU (no bf16 matmul units on these CPUs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
