"""Datasets by name: benchmarks (MNIST, Fashion-MNIST, KMNIST, CIFAR-10) and a user's own images.

``load_dataset(name, root, image_size, channels)`` returns a ``Dataset``: uint8 images
(N, C, S, S), int64 labels and a ``DatasetInfo``. Files by job: ``registry`` (the names and
the one entry point), ``idx`` / ``cifar`` / ``folder`` / ``arrays`` (one on-disk format each),
``convert`` (one image to uint8 (C, S, S)), ``cache`` (decode once, read back whole or in
chunks), ``checks`` (``DataError`` and the shared checks).
"""

from toolkit.datasets.checks import DataError
from toolkit.datasets.registry import BENCHMARKS, LOADERS, Dataset, DatasetInfo, check_labels_per_class, load_dataset

__all__ = ["BENCHMARKS", "LOADERS", "DataError", "Dataset", "DatasetInfo", "check_labels_per_class", "load_dataset"]
