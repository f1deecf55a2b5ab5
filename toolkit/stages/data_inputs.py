"""The data a stage reads: the dataset and its labeled / validation / pool split, and the data root
as Ray's workers receive it."""

from __future__ import annotations

from toolkit.config import Execution, Study
from toolkit.datasets.mnist import Mnist, Split, check_mnist, load_mnist, make_split, resolve_root


def load_data_and_split(study: Study, execution: Execution) -> tuple[Mnist, Split]:
    data = load_mnist(execution.run.data_root, execution.run.download, study.data.train_subset, study.data.test_subset)
    split = make_split(data.train_labels, study.split.labels_per_class, study.split.val_size, study.split.seed)
    return data, split


def data_root_for_workers(execution: Execution) -> str:
    """The data root as an absolute path, checked here first: one line in the driver, not a traceback per worker."""
    check_mnist(execution.run.data_root, execution.run.download)
    return str(resolve_root(execution.run.data_root))
