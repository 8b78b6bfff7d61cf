"""Models: the built-in ones, a user's own, their moving averages and evaluation."""
