"""The maths: pure torch (and scikit-learn) functions, no Ray, no MLflow, no files: on-device
augmentation, NT-Xent, the networks, schedules, pseudo-label selection, probes.
"""
