"""DeepSeek-V3 model: `from dsv3.model import ModelConfig, DeepSeekV3`."""

from dsv3.model.config import ConfigError, ModelConfig, RopeConfig
from dsv3.model.transformer import DeepSeekV3, ModelOutput

__all__ = ["ConfigError", "DeepSeekV3", "ModelConfig", "ModelOutput", "RopeConfig"]
