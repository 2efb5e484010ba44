"""Local training, data, aggregation rules and the role runtimes."""
