"""Tasks: build the model, turn examples into batches, compute loss and metrics."""
