"""Multi-Token Prediction: module k predicts the token k+1 positions ahead.

Module k combines the previous depth's representation of position i with the embedding of token
i+k: h'_i = eh_proj([enorm(embed(t_{i+k})) ; hnorm(h^{k-1}_i)]), runs one full decoder block over
those positions, and predicts with the main model's output head after its own `shared_head.norm`.
Embedding and output head are the main model's (shared, not copied).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.model.config import ModelConfig
from dsv3.model.decoder import DecoderLayer
from dsv3.model.layers import RMSNorm
from dsv3.model.moe import Routing


class MultiTokenPrediction(nn.Module):
    def __init__(self, config: ModelConfig, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, layer_idx=config.num_hidden_layers + depth - 1)
        self.shared_head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, h_prev_BTD: torch.Tensor, next_embeds_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, Routing | None]:
        """Both inputs cover the same T positions; returns this depth's hidden state (before its norm)."""
        x = self.eh_proj(torch.cat((self.enorm(next_embeds_BTD), self.hnorm(h_prev_BTD)), dim=-1))
        return self.block(x, cos, sin)
