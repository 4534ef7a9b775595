"""Parameter counts of the shipped flavours, built on the meta device (no memory)."""

import pytest
import torch

from dsv3.model import DeepSeekV3, ModelConfig
from dsv3.model.params import count_parameters


def _counts(flavour: str):
    with torch.device("meta"):
        model = DeepSeekV3(ModelConfig.flavour(flavour))
    assert all(p.is_meta for p in model.parameters())
    return count_parameters(model)


def test_671b_counts() -> None:
    counts = _counts("671b")
    assert counts.main == pytest.approx(671.0e9, rel=2e-3)  # DeepSeek-V3: 671B main model
    assert counts.mtp_in_checkpoint == pytest.approx(14e9, rel=0.05)  # ~14B MTP module as released
    assert counts.activated == pytest.approx(37e9, rel=0.03)  # ~37B activated per token


def test_16b_counts() -> None:
    counts = _counts("16b")
    assert counts.total == pytest.approx(15.7e9, rel=5e-3)  # DeepSeek-V2-Lite: 15.7B
    embedding = 102400 * 2048
    assert counts.activated - embedding == pytest.approx(
        2.4e9, rel=0.03
    )  # 2.4B activated (w/o input embedding)


def test_debug_counts_match_module_parameters(debug_model: DeepSeekV3) -> None:
    counts = count_parameters(debug_model)
    assert counts.total == sum(p.numel() for p in debug_model.parameters())
    assert counts.activated < counts.main
