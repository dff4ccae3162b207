"""Using a trained model: load a run's adapter or a merged export, `predict` and `chat`."""
