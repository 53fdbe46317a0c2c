"""Training state, steps, stages and checkpoints."""
