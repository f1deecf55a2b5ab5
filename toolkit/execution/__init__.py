"""The Ray edge, where and how work runs: Ray Train or this process (backends), the values that
cross to a worker (jobs), shared storage, the embedded local Ray, Ray Data pool inference.
"""
