"""The data a stage reads: the dataset and its labeled / validation / pool split, and the data root
as Ray's workers receive it."""

from __future__ import annotations

from toolkit.config import ConfigError, Execution, Study
from toolkit.datasets.mnist import Split, make_split, resolve_root
from toolkit.datasets.training_data import ImageData, load_image_data, real_split


def split_of(study: Study, data: ImageData) -> Split:
    """The study's split of ``data``: drawn by ``split.seed`` from a benchmark, the owner's labels for a real dataset."""
    if data.kind == "real":
        return real_split(data.train_labels, study.split.labels_per_class, data.spec.num_classes, data.class_names)
    return make_split(data.train_labels, study.split.labels_per_class, study.split.val_size, study.split.seed,
                      data.spec.num_classes)


def check_pretrain_batch(study: Study, split: Split) -> None:
    """ConfigError unless SimCLR's images (labeled + pool, at most ``pretrain.max_images``) fill one global batch."""
    n = len(split.labeled) + len(split.pool)
    n = min(n, study.pretrain.max_images) if study.pretrain.max_images else n
    if study.pretrain.batch_size > n:
        raise ConfigError(f"pretrain.batch_size={study.pretrain.batch_size} is not allowed: SimCLR trains on {n} "
                          f"images here (labeled + unlabeled), fewer than one batch; lower it to at most {n}")


def load_data_and_split(study: Study, execution: Execution) -> tuple[ImageData, Split]:
    data = load_image_data(study.data, execution.run.data_root, execution.run.download, execution.run.resident_mb << 20)
    return data, split_of(study, data)


def data_root_for_workers(execution: Execution) -> str:
    """The data root as an absolute path (a stage has read its data before it starts any worker)."""
    return str(resolve_root(execution.run.data_root))


def images_for_workers(data: ImageData) -> ImageData | None:
    """What a job carries of the images: a user's dataset itself (no other node can read its folder; Ray
    carries it through the object store), nothing for a benchmark (each node reads its own copy)."""
    return data if data.kind == "real" else None
