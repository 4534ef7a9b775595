"""Autoregressive generation with the compressed MLA cache: one prefill, then one token per step."""

from __future__ import annotations

import torch

from dsv3.model import DeepSeekV3


@torch.no_grad()
def generate(
    model: DeepSeekV3,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue each prompt row [B, T] by up to `max_new_tokens`; greedy when temperature == 0."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(
            f"prompt_ids must be a non-empty [batch, tokens] tensor, got {tuple(prompt_ids.shape)}"
        )
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError("max_new_tokens and temperature must be >= 0")
    model.eval()
    cache = model.new_cache(prompt_ids.shape[0], prompt_ids.shape[1] + max_new_tokens)
    logits = model(prompt_ids, cache=cache).logits[:, -1]
    out = [prompt_ids]
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    for _ in range(max_new_tokens):
        next_ids = _pick(logits.float(), temperature, top_k, generator)
        if eos_token_id is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, eos_token_id), next_ids)
            finished |= next_ids == eos_token_id
        out.append(next_ids[:, None])
        if finished.all():
            break
        logits = model(next_ids[:, None], cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)


def _pick(
    logits_BV: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator)[:, 0]
