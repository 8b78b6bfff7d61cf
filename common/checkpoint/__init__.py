"""Checkpoints: names and steps, TF's state file, key maps and TF1 Saver graphs."""
