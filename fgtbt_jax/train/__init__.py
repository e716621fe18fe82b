"""Training: FMB-loss, optimizer and EMA, sharding, train state and step, orbax checkpoints."""
