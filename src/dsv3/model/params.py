"""Parameter accounting: total, main model, MTP modules, and parameters activated per token."""

from __future__ import annotations

import dataclasses

from dsv3.model.transformer import DeepSeekV3


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    main: int  # everything except the MTP modules (embedding and head included)
    mtp: int  # MTP modules' own parameters (embedding and head are shared, not counted)
    mtp_in_checkpoint: int  # MTP tensors as the release stores them: own + copies of embedding and head
    activated: int  # main-model parameters one token passes through (K of E routed experts)

    @property
    def total(self) -> int:
        return self.main + self.mtp


def count_parameters(model: DeepSeekV3) -> ParameterCounts:
    """Works on the `meta` device: only shapes are read."""
    config = model.config
    mtp = sum(p.numel() for p in model.mtp.parameters())
    main = sum(p.numel() for p in model.parameters()) - mtp
    routed = sum(
        layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
        for layer in model.model.layers
        if layer.is_moe
    )
    active_routed = routed * config.num_experts_per_tok // config.n_routed_experts
    shared_copies = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    return ParameterCounts(
        main=main,
        mtp=mtp,
        mtp_in_checkpoint=mtp + len(model.mtp) * shared_copies,
        activated=main - routed + active_routed,
    )
