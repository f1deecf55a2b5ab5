"""The engine: the training and prediction loops written once, the per-worker training functions
that run them (on a Ray Train worker or in-process), torch.distributed, checkpoint files.
"""
