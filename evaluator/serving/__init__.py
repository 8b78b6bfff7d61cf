"""Serving: `evaluator export` writes a SavedModel, `predict` classifies image files.

It imports only `common/` and itself: serving needs a checkpoint and the run's settings, never
the watch loop, the ledger or the display.
"""
