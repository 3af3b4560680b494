"""One training rank: config, model, DeepSpeed engine, loop, checkpoints, export."""
