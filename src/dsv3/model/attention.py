"""Multi-head Latent Attention (MLA).

Keys and values are rebuilt from a low-rank latent c_KV (kv_lora_rank wide) plus one rope key shared
by every head. Two paths compute the same function:

- `forward_full` (training, prefill): expand the latent through `kv_b_proj` into per-head keys and
  values and run ordinary causal attention.
- `forward_cached` (incremental decoding): keep only the latent and the rope key in the cache and
  absorb `kv_b_proj` into the query (scores = (q_nope W_uk) . c_KV) and into the output
  (o = (p . c_KV) W_uv), so per-head keys and values are never materialised.

Shapes follow the legend in README.md: B batch, T new tokens, M key positions (cached + new), H heads,
Q per-head q/k width (U no-rope + R rope), A per-head value width, C kv_lora_rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import ops
from dsv3.model.cache import KVCache
from dsv3.model.config import ModelConfig
from dsv3.model.layers import RMSNorm
from dsv3.model.rope import apply_rotary

# DeepSeek's checkpoints normalise the two latents with this eps whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


def _rotate_key(rope_key_BTR: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The one rope key every head shares, rotated: [B, T, R]."""
    return apply_rotary(rope_key_BTR.unsqueeze(2), cos, sin).squeeze(2)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        qk_dim = config.qk_head_dim
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, config.hidden_size, bias=bias)

    # ---- shared projections ----------------------------------------------------------------------
    def _query_projection(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Every head's query, unrotated: [B, T, H*Q]."""
        if hasattr(self, "q_proj"):
            return self.q_proj(x_BTD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))

    def _queries(
        self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head (q_nope [B,T,H,U], rotated q_rope [B,T,H,R])."""
        return self._split_queries(self._query_projection(x_BTD), cos, sin)

    def _split_queries(
        self, q_BTX: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_BTHQ = q_BTX.unflatten(-1, (self.num_heads, self.nope_dim + self.rope_dim))
        q_nope, q_rope = q_BTHQ.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rotary(q_rope, cos, sin)

    def _latent_parts(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised latent c_KV [B,T,C], the shared rope key [B,T,R] before its rotation)."""
        latent, rope_key = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), rope_key

    def _latents(
        self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised latent c_KV [B,T,C], rotated shared rope key [B,T,R]): what the cache stores."""
        latent_BTC, rope_key_BTR = self._latent_parts(x_BTD)
        return latent_BTC, _rotate_key(rope_key_BTR, cos, sin)

    # ---- full path -------------------------------------------------------------------------------
    def forward_full(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x_BTD.shape
        q_BTX = self._query_projection(x_BTD)
        latent_BTC, rope_key_BTR = self._latent_parts(x_BTD)
        kv_BTY = self.kv_b_proj(latent_BTC)  # per head [k_nope | v]
        if self.v_dim <= self.nope_dim + self.rope_dim and ops.fused_cpu_training(
            q_BTX, kv_BTY, rope_key_BTR
        ):
            # float32 CPU training: rotations, concatenations and V's padding in one fused pass
            heads = ops.mla_heads(
                q_BTX, kv_BTY, rope_key_BTR, cos, sin, self.num_heads, self.nope_dim, self.v_dim
            )
        else:
            heads = self._heads(q_BTX, kv_BTY, rope_key_BTR, cos, sin)
        out_BHTQ = F.scaled_dot_product_attention(*heads, is_causal=True, scale=self.softmax_scale)
        out_BTHA = out_BHTQ[..., : self.v_dim].transpose(1, 2)
        return self.o_proj(out_BTHA.reshape(batch, tokens, self.num_heads * self.v_dim))

    def _heads(
        self,
        q_BTX: torch.Tensor,
        kv_BTY: torch.Tensor,
        rope_key_BTR: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SDPA's q, k [B, H, T, Q] and v [B, H, T, max(A, Q)] from the projections (V zero-padded)."""
        q_nope, q_rope = self._split_queries(q_BTX, cos, sin)
        rope_key_BTR = _rotate_key(rope_key_BTR, cos, sin)
        kv_per_head = kv_BTY.unflatten(-1, (self.num_heads, self.nope_dim + self.v_dim))
        k_nope, v_BTHA = kv_per_head.split([self.nope_dim, self.v_dim], dim=-1)
        rope_key_BTHR = rope_key_BTR[:, :, None, :].expand(-1, -1, self.num_heads, -1)
        q_BHTQ = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)
        k_BHTQ = torch.cat((k_nope, rope_key_BTHR), dim=-1).transpose(1, 2)
        v_BHTA = v_BTHA.transpose(1, 2)
        qk_dim = self.nope_dim + self.rope_dim
        if self.v_dim < qk_dim:
            # Fused (flash) SDPA kernels want one head width; zero columns of V add zero output columns.
            v_BHTA = F.pad(v_BHTA, (0, qk_dim - self.v_dim))  # now [B, H, T, Q]
        return q_BHTQ, k_BHTQ, v_BHTA

    # ---- absorbed, cached path -------------------------------------------------------------------
    def forward_cached(
        self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int
    ) -> torch.Tensor:
        batch, tokens, _ = x_BTD.shape
        q_nope, q_rope = self._queries(x_BTD, cos, sin)
        latent_BTC, rope_key_BTR = self._latents(x_BTD, cos, sin)
        latent_BMC, rope_key_BMR = cache.write(layer, latent_BTC, rope_key_BTR)
        w_kv = self.kv_b_proj.weight.unflatten(0, (self.num_heads, self.nope_dim + self.v_dim))
        w_uk_HUC, w_uv_HAC = w_kv.split([self.nope_dim, self.v_dim], dim=1)
        q_latent_BTHC = torch.einsum("bthn,hnc->bthc", q_nope, w_uk_HUC)
        scores_BHTM = (
            torch.einsum("bthc,bsc->bhts", q_latent_BTHC, latent_BMC)
            + torch.einsum("bthr,bsr->bhts", q_rope, rope_key_BMR)
        ) * self.softmax_scale
        cached = latent_BMC.shape[1] - tokens
        query_pos = torch.arange(tokens, device=x_BTD.device)[:, None] + cached
        key_pos = torch.arange(latent_BMC.shape[1], device=x_BTD.device)[None, :]
        scores_BHTM = scores_BHTM.masked_fill(key_pos > query_pos, float("-inf"))
        probs_BHTM = scores_BHTM.float().softmax(dim=-1).to(latent_BMC.dtype)
        out_latent_BTHC = torch.einsum("bhts,bsc->bthc", probs_BHTM, latent_BMC)
        out_BTHA = torch.einsum("bthc,hvc->bthv", out_latent_BTHC, w_uv_HAC)
        return self.o_proj(out_BTHA.reshape(batch, tokens, self.num_heads * self.v_dim))

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        if cache is None:
            return self.forward_full(x_BTD, cos, sin)
        return self.forward_cached(x_BTD, cos, sin, cache, layer)
