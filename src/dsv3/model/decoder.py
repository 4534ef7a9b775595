"""One pre-norm decoder block: MLA attention, then a dense SwiGLU FFN or a DeepSeekMoE layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsv3.model.attention import MultiHeadLatentAttention
from dsv3.model.cache import KVCache
from dsv3.model.config import ModelConfig
from dsv3.model.layers import RMSNorm, SwiGLUMLP
from dsv3.model.moe import MoE, Routing


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MoE | SwiGLUMLP = (
            MoE.from_config(config)
            if config.is_moe_layer(layer_idx)
            else SwiGLUMLP(config.hidden_size, config.intermediate_size)
        )
        # Recompute this whole layer in the backward pass (dsv3.model.recompute sets it).
        self.recompute = False

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(
        self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, Routing | None]:
        if self.recompute and cache is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x_BTD, cos, sin, None, use_reentrant=False)
        return self._forward(x_BTD, cos, sin, cache)

    def _forward(
        self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None
    ) -> tuple[torch.Tensor, Routing | None]:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, cache, self.layer_idx)
        normed = self.post_attention_layernorm(x_BTD)
        if isinstance(self.mlp, MoE):
            ffn_out, routing = self.mlp(normed)
            return x_BTD + ffn_out, routing
        return x_BTD + self.mlp(normed), None
