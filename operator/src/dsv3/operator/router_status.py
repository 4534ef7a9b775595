"""Read a serving job's expert placement from its router's `RouterService.Placement` RPC (router.proto).

The call itself is `status_rpc.call_status` (stubs imported lazily, a deadline). Without an answer
`read_placement` returns None and the job's status keeps what the pods say.
"""

from __future__ import annotations

import dataclasses

from dsv3.operator.status_rpc import call_status


@dataclasses.dataclass(frozen=True)
class PlacementStatus:
    version: int
    balancedness: float  # max / mean shard load of the router's recent window (1.0 = perfect)
    live_shards: int
    rebalances: int
    last_change: str  # reason of the last placement change
    slots_moved: int  # by the last change


def read_placement(address: str, timeout: float = 2.0) -> PlacementStatus | None:
    """One Placement call to `address` (host:port) with a deadline; None if unavailable for any reason."""
    reply = call_status("router", "RouterService", "Placement", "PlacementRequest", address, timeout)
    if reply is None:
        return None
    balance = reply.window_balancedness or reply.balancedness
    return PlacementStatus(
        version=reply.version,
        balancedness=round(balance, 4),
        live_shards=sum(1 for s in reply.shards if s.live),
        rebalances=reply.rebalances,
        last_change=reply.last_change.reason,
        slots_moved=reply.last_change.slots_moved,
    )
