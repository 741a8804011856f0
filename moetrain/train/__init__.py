"""Training: `python -m moetrain.train --config X.yaml [key=value ...]` (also `moetrain-train`)."""
