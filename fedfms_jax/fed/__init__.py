"""The federated engine: partition, local rounds, aggregation, sharding, checkpoints."""
