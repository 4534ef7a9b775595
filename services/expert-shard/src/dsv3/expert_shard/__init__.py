"""dsv3 expert shard: routed-expert slots behind gRPC (`ExpertShardService`)."""
