"""Training: configs, optimizer, train step, loop, metrics."""
