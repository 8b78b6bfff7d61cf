"""Shared core of the trainer/evaluator pair: data, models, checkpoint layout, run config."""

__version__ = "0.1.0"
