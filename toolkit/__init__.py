"""toolkit: image classifiers from very few labels (SimCLR, probes, pseudo-labeling) on Ray + MLflow."""

__version__ = "0.1.0"
