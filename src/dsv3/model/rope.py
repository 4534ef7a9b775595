"""Rotary position embedding with DeepSeek-V3's YaRN context extension.

Frequencies follow the YaRN recipe the checkpoint format specifies: inside the band between the
beta_fast and beta_slow correction dimensions the frequency blends linearly from the original one
(high-frequency end) to the one interpolated by `factor`. Rotation acts on interleaved pairs
(2i, 2i+1), which is how DeepSeek's weights lay the rope dimensions out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Self

import torch

from dsv3.model.config import ModelConfig, RopeConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_positions: int) -> float:
    """The rotary dimension whose wavelength completes `num_rotations` turns over `max_positions`."""
    return dim * math.log(max_positions / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inverse_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Per-pair angular frequencies [dim/2] in float32 on the CPU, YaRN-blended when configured.

    Always computed on the CPU: under `torch.device("meta")` arange goes through torch's Python
    references, whose first use imports ~150 MiB of torch._dynamo.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    original = 1.0 / (rope.theta**exponents)
    if rope.rope_type != "yarn":
        return original
    assert rope.original_max_position_embeddings is not None
    low = _correction_dim(rope.beta_fast, dim, rope.theta, rope.original_max_position_embeddings)
    high = _correction_dim(rope.beta_slow, dim, rope.theta, rope.original_max_position_embeddings)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width band would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    # ramp 0 keeps the original (extrapolated) frequency, ramp 1 takes the interpolated one.
    return original * (1 - ramp) + (original / rope.factor) * ramp


def rotary_amplitude(rope: RopeConfig) -> float:
    """YaRN's cos/sin amplitude: m(factor, mscale) / m(factor, mscale_all_dim) (1.0 for DeepSeek-V3)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor, 1.0)


class RotaryEmbedding(torch.nn.Module):
    """Produces (cos, sin) tables [T, dim/2] for given positions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.rope = config.rope
        self.dim = config.qk_rope_head_dim
        self.amplitude = rotary_amplitude(config.rope)
        frequencies = inverse_frequencies(self.rope, self.dim).to(torch.get_default_device())
        self.register_buffer("inv_freq", frequencies, persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        """Moves follow the module; dtype casts and `to_empty` do not reach the frequencies.

        In bf16 a frequency keeps 8 bits, which puts radians of error into the angles of positions
        in the thousands; `to_empty` would leave them uninitialised. They are rebuilt in float32.
        """
        super()._apply(fn, recurse)
        self.inv_freq = inverse_frequencies(self.rope, self.dim).to(self.inv_freq.device)
        return self

    def forward(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions_T.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.amplitude, angles.sin() * self.amplitude


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, R] by per-position angles (cos, sin: [T, R/2]).

    Each pair (x_2i, x_2i+1) is read as the complex number x_2i + i*x_2i+1 and multiplied by
    cos + i*sin: one fused complex multiply instead of a handful of strided elementwise ops.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotation = torch.complex(cos, sin)[:, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)
