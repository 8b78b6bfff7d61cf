"""The training half of the pair: writes crash-safe checkpoints with EMA shadows into a workdir."""
