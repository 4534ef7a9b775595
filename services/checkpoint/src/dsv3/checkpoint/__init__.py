"""dsv3 checkpoint service and its Python client: `from dsv3.checkpoint import CheckpointClient`.

The client is imported on first use so that the server process, which never needs it, does not
import torch. The server installs with dsv3-rpc alone; the client also needs torch, numpy and the core
`dsv3` (its tensor codec): `pip install 'dsv3-checkpoint[client]'`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv3.checkpoint.client import CheckpointClient

__all__ = ["CheckpointClient"]


def __getattr__(name: str) -> Any:
    if name == "CheckpointClient":
        from dsv3.checkpoint.client import CheckpointClient

        return CheckpointClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
