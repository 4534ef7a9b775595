"""Shared test configuration: skip `gpu` tests without CUDA, seed every test, debug-model fixtures."""

import pytest
import torch

from dsv3.model import DeepSeekV3, ModelConfig


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def debug_config() -> ModelConfig:
    return ModelConfig.flavour("debug")


@pytest.fixture
def debug_model(debug_config: ModelConfig) -> DeepSeekV3:
    """The CPU debug flavour in float32, in eval mode, seeded."""
    torch.manual_seed(0)
    return DeepSeekV3(debug_config).eval()
