"""dsv3 checkpoint service and its Python client: `from dsv3.checkpoint import CheckpointClient`."""

from dsv3.checkpoint.client import CheckpointClient

__all__ = ["CheckpointClient"]
