"""The DeepSeek-V3 causal language model: embeddings, decoder stack, output head and MTP modules.

Module names mirror the Hugging Face checkpoint (`model.embed_tokens`, `model.layers.{i}.self_attn...`,
`model.norm`, `lm_head`), so `dsv3.model.hf` only has to translate the stacked experts and the MTP
modules.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from dsv3.balance.bias import apply_bias_update, expert_load
from dsv3.model.cache import KVCache
from dsv3.model.config import ModelConfig
from dsv3.model.decoder import DecoderLayer
from dsv3.model.fp8_linear import convert_to_fp8
from dsv3.model.layers import RMSNorm
from dsv3.model.moe import Gate, GroupedExperts, Routing
from dsv3.model.mtp import MultiTokenPrediction
from dsv3.model.rope import RotaryEmbedding


@dataclasses.dataclass
class ModelOutput:
    """What a forward pass returns.

    - logits [B, T, V]: row i predicts token i+1.
    - mtp_logits: one [B, T-k, V] tensor per MTP depth k = 1.., row i predicting token i+k+1
      (empty when decoding with a cache).
    - expert_loads [gates, E] int64: tokens routed to each expert by each gate in this pass, main MoE
      layers first, then the MTP blocks, in the order of `DeepSeekV3.gates()`. The bias update reads
      them outside the forward (the trainer sums them over micro-batches and ranks first).
    - routings: every gate's decision that ran, in the same order (the sequence-wise balance loss,
      `dsv3.balance.bias.sequence_balance_loss_of`, is computed from them); `batch` sequences.
    """

    logits: torch.Tensor
    mtp_logits: list[torch.Tensor]
    expert_loads: torch.Tensor
    routings: list[Routing] = dataclasses.field(default_factory=list)
    batch: int = 1
    hidden_states: torch.Tensor | None = None


class Backbone(nn.Module):
    """Embedding, decoder layers and final norm: the `model.` prefix of the checkpoint."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # `_weight` skips nn.Embedding's own normal_ init: DeepSeekV3.reset_parameters initialises it, and
        # normal_ on the meta device imports ~150 MiB of torch._dynamo the first time.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepSeekV3(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MultiTokenPrediction(config, depth) for depth in range(1, config.num_nextn_predict_layers + 1)
        )
        self.rotary_emb = RotaryEmbedding(config)
        if self.lm_head.weight.device.type != "meta":  # nothing to initialise on meta (see Backbone)
            self.reset_parameters()

    # ---- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) for every matrix, ones for norms, zeros for routing biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=std)
            elif isinstance(module, Gate):
                nn.init.normal_(module.weight, std=std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def enable_fp8_training(self, scale_fmt: str | None = None, *, routed_experts: bool = True) -> list[str]:
        """Run the attention projections, dense MLPs, shared experts, MTP projections and (unless
        `routed_experts=False`) the routed experts' grouped GEMMs in FP8, forward and backward.

        As in DeepSeek-V3's mixed-precision framework (report, section 3.3.1), the embedding, the output
        head, the MoE gates, the norms and the attention core keep their precision.
        Call after initialisation or loading; returns the converted module names.
        """
        return convert_to_fp8(
            self, keep=lambda name: name == "lm_head", scale_fmt=scale_fmt, routed_experts=routed_experts
        )

    # ---- routing state ---------------------------------------------------------------------------
    def gates(self) -> list[Gate]:
        """Every MoE gate: main layers in order, then the MTP blocks."""
        blocks = [*self.model.layers, *(m.block for m in self.mtp)]
        return [b.mlp.gate for b in blocks if b.is_moe]

    def update_routing_bias(self, expert_loads: torch.Tensor, gamma: float) -> None:
        """Aux-loss-free balancing step: nudge each gate's selection bias towards equal load."""
        apply_bias_update([g.e_score_correction_bias for g in self.gates()], expert_loads, gamma)

    def new_cache(self, batch: int, max_length: int) -> KVCache:
        weight = self.lm_head.weight
        return KVCache(
            self.config, self.config.num_hidden_layers, batch, max_length, weight.dtype, weight.device
        )

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        compute_mtp: bool | None = None,
    ) -> ModelOutput:
        """Logits for `input_ids` [B, T]; with a cache, the tokens continue the cached sequences."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        batch, tokens = input_ids.shape
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + tokens, device=input_ids.device)
        cos, sin = self.rotary_emb(positions)
        embeds = self.model.embed_tokens(input_ids)
        hidden = embeds
        routings: list[Routing] = []
        for layer in self.model.layers:
            hidden, routing = layer(hidden, cos, sin, cache)
            if routing is not None:
                routings.append(routing)
        if cache is not None:
            cache.advance(tokens)
        hidden = self.model.norm(hidden)
        logits = self.lm_head(hidden)

        mtp_logits: list[torch.Tensor] = []
        mtp_routings: list[Routing] = []
        if compute_mtp if compute_mtp is not None else cache is None:
            h_prev = hidden
            for depth, module in enumerate(self.mtp, start=1):
                width = tokens - depth
                if width <= 0:
                    break
                h_prev, routing = module(h_prev[:, :width], embeds[:, depth:], cos[:width], sin[:width])
                mtp_routings.append(routing)
                mtp_logits.append(self.lm_head(module.shared_head_norm(h_prev)))

        loads = self._expert_loads(routings, mtp_routings)
        return ModelOutput(logits, mtp_logits, loads, routings + mtp_routings, batch, hidden)

    def _expert_loads(self, routings: list[Routing], mtp_routings: list[Routing]) -> torch.Tensor:
        """Loads of every gate; MTP gates that did not run this pass report zero."""
        experts = self.config.n_routed_experts
        rows = [expert_load(r.ids_TK, experts) for r in routings]
        mtp_gates = len(self.gates()) - len(routings)
        rows += [expert_load(r.ids_TK, experts) for r in mtp_routings]
        device = self.lm_head.weight.device
        rows += [torch.zeros(experts, dtype=torch.long, device=device)] * (mtp_gates - len(mtp_routings))
        if not rows:
            return torch.zeros(0, experts, dtype=torch.long, device=device)
        return torch.stack(rows)

    # ---- Hugging Face checkpoint format ----------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> DeepSeekV3:
        from dsv3.model.hf import load_pretrained

        return load_pretrained(cls, directory, dtype=dtype, device=device)

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 4 << 30) -> None:
        from dsv3.model.hf import save_pretrained

        save_pretrained(self, directory, max_shard_bytes=max_shard_bytes)
