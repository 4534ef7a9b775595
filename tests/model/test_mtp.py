"""Multi-Token Prediction: row i of depth k sees tokens <= i+k and predicts token i+k+1."""

import torch

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.loss import language_model_loss


def _two_depth_model() -> DeepSeekV3:
    config = ModelConfig.flavour("debug").replace(num_nextn_predict_layers=2)
    return DeepSeekV3(config).eval()


@torch.no_grad()
def test_mtp_shapes_per_depth() -> None:
    model = _two_depth_model()
    out = model(torch.randint(0, 256, (2, 12)))
    assert [tuple(t.shape) for t in out.mtp_logits] == [(2, 11, 320), (2, 10, 320)]


@torch.no_grad()
def test_depth_one_is_the_documented_composition(debug_model: DeepSeekV3) -> None:
    ids = torch.randint(0, 256, (2, 10))
    out = debug_model(ids)
    module = debug_model.mtp[0]
    embeds = debug_model.model.embed_tokens(ids)
    positions = torch.arange(9)
    cos, sin = debug_model.rotary_emb(positions)
    combined = module.eh_proj(
        torch.cat((module.enorm(embeds[:, 1:]), module.hnorm(out.hidden_states[:, :9])), -1)
    )
    block_out, _ = module.block(combined, cos, sin)
    expected = debug_model.lm_head(module.shared_head_norm(block_out))
    assert torch.allclose(out.mtp_logits[0], expected, atol=1e-6)


@torch.no_grad()
def test_rows_see_exactly_the_tokens_up_to_their_offset() -> None:
    model = _two_depth_model()
    ids = torch.randint(0, 256, (1, 12))
    base = model(ids)
    for depth, logits in enumerate(base.mtp_logits, start=1):
        for row in (2, 5):
            visible = row + depth  # row i of depth k may use tokens 0..i+k
            future = ids.clone()
            future[0, visible + 1] = (ids[0, visible + 1] + 1) % 256
            assert torch.allclose(model(future).mtp_logits[depth - 1][0, row], logits[0, row], atol=1e-6)
            current = ids.clone()
            current[0, visible] = (ids[0, visible] + 1) % 256
            assert not torch.allclose(model(current).mtp_logits[depth - 1][0, row], logits[0, row], atol=1e-4)


def test_mtp_loss_targets_the_right_offsets() -> None:
    model = _two_depth_model()
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids)
    # make each depth's logits put all mass on the token k+1 ahead: its loss must then be ~0
    for depth, logits in enumerate(out.mtp_logits, start=1):
        target = torch.full_like(logits, -1e4)
        rows = ids.shape[1] - depth - 1
        target[:, :rows].scatter_(-1, ids[:, depth + 1 :, None], 1e4)
        out.mtp_logits[depth - 1] = target
    parts = language_model_loss(out, ids, mtp_weight=0.3)
    assert parts.mtp is not None and parts.mtp.item() < 1e-3
    assert torch.allclose(parts.total, parts.main + 0.3 * parts.mtp)


def test_no_mtp_while_decoding(debug_model: DeepSeekV3) -> None:
    with torch.no_grad():
        out = debug_model(torch.zeros(1, 3, dtype=torch.long), cache=debug_model.new_cache(1, 8))
    assert out.mtp_logits == []
