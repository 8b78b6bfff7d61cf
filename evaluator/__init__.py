"""The evaluating half of the pair: watches a workdir and evaluates every checkpoint it commits."""
