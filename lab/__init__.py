"""FL Security Lab shared kernel: config, data, models, triggers, training, metrics, artifacts."""
