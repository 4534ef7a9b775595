"""Fixtures for model tests: the debug flavour in float32."""

import pytest
import torch

from dsv3.model import DeepSeekV3, ModelConfig


@pytest.fixture
def debug_config() -> ModelConfig:
    return ModelConfig.flavour("debug")


@pytest.fixture
def debug_model(debug_config: ModelConfig) -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(debug_config).eval()
