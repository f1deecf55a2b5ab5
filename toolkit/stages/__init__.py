"""One module per command: each stage opens its MLflow run, drives the engine through a backend, logs results."""
