"""Datasets: the built-in MNIST family, a user's own data, their files and input specs."""
