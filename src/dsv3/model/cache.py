"""The compressed KV cache of Multi-head Latent Attention.

Per layer and token it holds only the normalized KV latent (kv_lora_rank values) and the rotated
rope key shared by all heads (qk_rope_head_dim values): for DeepSeek-V3 that is 576 numbers per token
and layer instead of 2 * 128 heads * 128 = 32768 for ordinary multi-head attention.
"""

from __future__ import annotations

import torch

from dsv3.model.config import ModelConfig


class KVCache:
    """Preallocated latent cache for `num_layers` layers, `batch` sequences, up to `max_length` tokens."""

    def __init__(
        self,
        config: ModelConfig,
        num_layers: int,
        batch: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if batch <= 0 or max_length <= 0:
            raise ValueError(f"KVCache needs batch > 0 and max_length > 0, got {batch}, {max_length}")
        self.max_length = max_length
        self.length = 0
        self.latent_LBMC = torch.zeros(
            num_layers, batch, max_length, config.kv_lora_rank, dtype=dtype, device=device
        )
        self.rope_key_LBMR = torch.zeros(
            num_layers, batch, max_length, config.qk_rope_head_dim, dtype=dtype, device=device
        )

    @property
    def batch(self) -> int:
        return self.latent_LBMC.shape[1]

    def write(
        self, layer: int, latent_BTC: torch.Tensor, rope_key_BTR: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's entries after the cached ones; return everything cached for the layer so far."""
        new = latent_BTC.shape[1]
        end = self.length + new
        if latent_BTC.shape[0] != self.batch:
            raise ValueError(f"cache holds batch {self.batch}, got {latent_BTC.shape[0]} sequences")
        if end > self.max_length:
            raise ValueError(
                f"KV cache full: {self.length} + {new} tokens exceeds max_length {self.max_length}"
            )
        self.latent_LBMC[layer, :, self.length : end] = latent_BTC
        self.rope_key_LBMR[layer, :, self.length : end] = rope_key_BTR
        return self.latent_LBMC[layer, :, :end], self.rope_key_LBMR[layer, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called by the model once every layer has written this step's tokens."""
        self.length += num_tokens

    def bytes_per_token(self) -> int:
        per_layer = self.latent_LBMC.shape[-1] + self.rope_key_LBMR.shape[-1]
        return per_layer * self.latent_LBMC.shape[0] * self.latent_LBMC.element_size()
