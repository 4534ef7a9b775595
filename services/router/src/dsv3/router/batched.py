"""One forward step for a continuous batch: sequences at different lengths, each in its own cache row.

The core's `KVCache` keeps one length for the whole batch; a continuous batch needs one per sequence.
`SlotCache` holds the same compressed MLA entries (latent + shared rope key per token and layer) for
`max_batch` sequence slots with a length each, and `step` runs the model's own modules over it: the
absorbed-projection attention of `MultiHeadLatentAttention.forward_cached` with per-row positions and
masks, then the layer's MLP (the MoE with the remote experts) on the real tokens only. Prompts of a
prefill are right-padded: causal masking keeps pads out of every real token, and a pad's cache entry
lies past its row's length, so it is masked and later overwritten. The same holds for a rejected
speculative draft: rolling back is lowering the row's length. `mtp_step` runs the first MTP block on
a cache layer of its own (after the main layers) for speculative decoding.
"""

from __future__ import annotations

import torch

from dsv3.model import DeepSeekV3
from dsv3.model.attention import MultiHeadLatentAttention
from dsv3.model.decoder import DecoderLayer


class SlotCache:
    def __init__(self, model: DeepSeekV3, max_batch: int, max_length: int, mtp_layers: int = 0) -> None:
        """`mtp_layers`: cache layers for MTP blocks too (speculative decoding), after the main ones."""
        config = model.config
        weight = model.lm_head.weight
        layers = config.num_hidden_layers + mtp_layers
        self.max_length = max_length
        self.latent_LBMC = torch.zeros(
            layers, max_batch, max_length, config.kv_lora_rank, dtype=weight.dtype, device=weight.device
        )
        self.rope_key_LBMR = torch.zeros(
            layers, max_batch, max_length, config.qk_rope_head_dim, dtype=weight.dtype, device=weight.device
        )
        self.lengths = [0] * max_batch
        self.free = list(range(max_batch - 1, -1, -1))

    def take(self) -> int:
        slot = self.free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.free.append(slot)


def _rotate(x_BTHR: torch.Tensor, cos_BTP: torch.Tensor, sin_BTP: torch.Tensor) -> torch.Tensor:
    """`rope.apply_rotary` with per-row positions (cos, sin: [B, T, R/2])."""
    pairs = torch.view_as_complex(x_BTHR.float().unflatten(-1, (-1, 2)).contiguous())
    rotation = torch.complex(cos_BTP, sin_BTP)[:, :, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x_BTHR.dtype)


def _attention(
    attn: MultiHeadLatentAttention,
    x_BTD: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: SlotCache,
    layer: int,
    slots_B: torch.Tensor,
    pos_BT: torch.Tensor,
    keys: int,
) -> torch.Tensor:
    batch, tokens, _ = x_BTD.shape
    if hasattr(attn, "q_proj"):
        q = attn.q_proj(x_BTD)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x_BTD)))
    q_nope, q_rope = q.unflatten(-1, (attn.num_heads, attn.nope_dim + attn.rope_dim)).split(
        [attn.nope_dim, attn.rope_dim], dim=-1
    )
    q_rope = _rotate(q_rope, cos, sin)
    latent, rope_key = attn.kv_a_proj_with_mqa(x_BTD).split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    rope_key = _rotate(rope_key.unsqueeze(2), cos, sin).squeeze(2)
    latent = attn.kv_a_layernorm(latent)
    rows = slots_B[:, None].expand(-1, tokens)
    cache.latent_LBMC[layer, rows, pos_BT] = latent
    cache.rope_key_LBMR[layer, rows, pos_BT] = rope_key
    latent_BMC = cache.latent_LBMC[layer, slots_B, :keys]
    rope_key_BMR = cache.rope_key_LBMR[layer, slots_B, :keys]
    w_kv = attn.kv_b_proj.weight.unflatten(0, (attn.num_heads, attn.nope_dim + attn.v_dim))
    w_uk_HUC, w_uv_HAC = w_kv.split([attn.nope_dim, attn.v_dim], dim=1)
    q_latent_BTHC = torch.einsum("bthn,hnc->bthc", q_nope, w_uk_HUC)
    scores_BHTM = (
        torch.einsum("bthc,bsc->bhts", q_latent_BTHC, latent_BMC)
        + torch.einsum("bthr,bsr->bhts", q_rope, rope_key_BMR)
    ) * attn.softmax_scale
    key_pos = torch.arange(keys, device=x_BTD.device)
    masked_BTM = key_pos[None, None, :] > pos_BT[:, :, None]
    scores_BHTM = scores_BHTM.masked_fill(masked_BTM[:, None], float("-inf"))
    probs_BHTM = scores_BHTM.float().softmax(dim=-1).to(latent_BMC.dtype)
    out_latent_BTHC = torch.einsum("bhts,bsc->bthc", probs_BHTM, latent_BMC)
    out_BTHA = torch.einsum("bthc,hvc->bthv", out_latent_BTHC, w_uv_HAC)
    return attn.o_proj(out_BTHA.reshape(batch, tokens, attn.num_heads * attn.v_dim))


def _run_blocks(
    model: DeepSeekV3,
    cache: SlotCache,
    blocks: list[tuple[int, DecoderLayer]],
    hidden_BTD: torch.Tensor,
    valid_BT: torch.Tensor,
    slots: list[int],
    starts: list[int],
) -> torch.Tensor:
    """Decoder blocks (with their cache layer index) over new tokens at per-row start positions."""
    device = hidden_BTD.device
    batch, tokens = valid_BT.shape
    start_B = torch.tensor(starts, dtype=torch.long, device=device)
    if int((start_B + tokens).max()) > cache.max_length:
        raise ValueError(f"context of {cache.max_length} tokens exceeded")
    pos_BT = start_B[:, None] + torch.arange(tokens, device=device)
    cos, sin = model.rotary_emb(pos_BT.reshape(-1))
    cos, sin = cos.view(batch, tokens, -1), sin.view(batch, tokens, -1)
    keys = int((start_B + tokens).max())
    slots_B = torch.tensor(slots, dtype=torch.long, device=device)
    hidden = hidden_BTD
    for index, layer in blocks:
        attn_in = layer.input_layernorm(hidden)
        hidden = hidden + _attention(layer.self_attn, attn_in, cos, sin, cache, index, slots_B, pos_BT, keys)
        normed = layer.post_attention_layernorm(hidden)[valid_BT]  # real tokens only: pads skip the MLP
        ffn = layer.mlp(normed[None])
        ffn = ffn[0] if isinstance(ffn, tuple) else ffn
        update = torch.zeros_like(hidden)
        update[valid_BT] = ffn[0]
        hidden = hidden + update
    return hidden


def _padded(token_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and which of them are real, built in one tensor each."""
    tokens = max(len(t) for t in token_lists)
    ids_BT = torch.tensor([[*t, *[0] * (tokens - len(t))] for t in token_lists], dtype=torch.long)
    valid_BT = torch.tensor([[True] * len(t) + [False] * (tokens - len(t)) for t in token_lists])
    return ids_BT.to(device), valid_BT.to(device)


@torch.no_grad()
def forward(
    model: DeepSeekV3, cache: SlotCache, slots: list[int], token_lists: list[list[int]]
) -> torch.Tensor:
    """Append each sequence's new tokens to its cache slot; the final-norm hidden states [B, T, D] of
    every new position (right-padded), which the head and the MTP module read."""
    device = model.lm_head.weight.device
    ids_BT, valid_BT = _padded(token_lists, device)
    starts = [cache.lengths[s] for s in slots]
    blocks = list(enumerate(model.model.layers))
    hidden = _run_blocks(model, cache, blocks, model.model.embed_tokens(ids_BT), valid_BT, slots, starts)
    for slot, ids in zip(slots, token_lists, strict=True):
        cache.lengths[slot] += len(ids)
    return model.model.norm(hidden)


@torch.no_grad()
def step(model: DeepSeekV3, cache: SlotCache, slots: list[int], token_lists: list[list[int]]) -> torch.Tensor:
    """Append each sequence's new tokens (a prompt, or one token) to its cache slot; the logits after
    each sequence's last new token [B, V]."""
    hidden = forward(model, cache, slots, token_lists)
    device = hidden.device
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    last = hidden[torch.arange(len(slots), device=device), lengths - 1]
    return model.lm_head(last)


@torch.no_grad()
def mtp_step(
    model: DeepSeekV3,
    cache: SlotCache,
    slots: list[int],
    starts: list[int],
    hidden_BTD: torch.Tensor,
    token_lists: list[list[int]],
) -> torch.Tensor:
    """The first MTP module over new positions: position i combines the main model's hidden state h_i
    (`hidden_BTD[b, i - starts[b]]`, right-padded, at least as long as the longest token list) with the
    embedding of token i+1 (`token_lists[b]`), runs the block on the MTP cache layer (after the main
    layers) from `starts[b]`, and returns the logits of each row's last position [B, V]: the draft of
    the token after next."""
    module = model.mtp[0]
    device = model.lm_head.weight.device
    ids_BT, valid_BT = _padded(token_lists, device)
    h_BTD = hidden_BTD[:, : ids_BT.shape[1]]
    embeds = module.enorm(model.model.embed_tokens(ids_BT))
    x_BTD = module.eh_proj(torch.cat((embeds, module.hnorm(h_BTD)), dim=-1))
    blocks = [(model.config.num_hidden_layers, module.block)]
    hidden = _run_blocks(model, cache, blocks, x_BTD, valid_BT, slots, starts)
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    last = hidden[torch.arange(len(slots), device=device), lengths - 1]
    return model.lm_head(module.shared_head_norm(last))
