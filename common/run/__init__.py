"""A run: what it was trained with (run.json), the files the programs exchange, naming and loading checkpoints."""
