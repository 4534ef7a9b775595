"""dsv3 router: serves a model whose routed experts live on expert shards.

`from dsv3.router import RouterClient` imports only the client (grpc, torch, the stubs): none of the
server's modules or dependencies.
"""

from dsv3.router.client import RouterClient

__all__ = ["RouterClient"]
