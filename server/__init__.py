"""The coordinator: Flower ServerApp, aggregation, checkpoints and the round log."""
