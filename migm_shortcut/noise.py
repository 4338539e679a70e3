"""Counter-based sampling noise: uniforms that are a pure function of (seed, sample, step, position).

The sampler needs two uniforms per still-masked position and step (the categorical draw and the
confidence noise). Drawing them from a generator per sample would make them on the host, sample by
sample, and copy them to the device every step; hashing the integers that name each draw instead
makes the whole batch's noise in a few elementwise kernels wherever the tensors live, and a
sample's noise cannot depend on its batch, its slice or the number of workers.

The hash is murmur3's 32-bit finaliser, chained over the inputs. It runs on int64 tensors holding
32-bit values; the multipliers are written as their signed 32-bit equivalents so that products stay
inside int64 (no overflow), and masking keeps the low 32 bits, which is all the hash uses.
"""

import torch

_MASK = 0xFFFFFFFF
_C1 = 0x85EBCA6B - 2**32  # murmur3 fmix32 constants, as signed values (same low 32 bits)
_C2 = 0xC2B2AE35 - 2**32
STREAMS = 2  # per (sample, step, position): 0 = the categorical draw, 1 = the confidence noise


def _mix(x):
    """The finaliser on an int64 tensor or a Python int (the same bit operations hold for both)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _MASK
    x = x ^ (x >> 13)
    x = (x * _C2) & _MASK
    return x ^ (x >> 16)


def sample_keys(seed: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per sample [B] (int64), from the run's seed and each sample's index."""
    seed_key = _mix((seed & _MASK) ^ _mix(seed >> 32))
    return _mix((sample_ids.long() & _MASK) ^ seed_key)


def uniforms(keys: torch.Tensor, step: int, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniforms in (0, 1), float32 [B, M], for samples `keys` [B] at `positions` [B, M] of `step`.

    24 bits each (float32's mantissa): the smallest is 2^-25, so logs of them stay finite."""
    counter = _mix(step * STREAMS + stream)  # a Python int: nothing is copied to the device
    h = _mix(_mix(keys[:, None] ^ counter) ^ positions.long())
    return ((h >> 8).float() + 0.5) * 2.0**-24
