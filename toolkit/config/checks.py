"""Checks across config sections that only matter to the commands using them (a batch larger
than the images it samples from, more Ray workers than the embedded Ray has CPUs).

Kept out of ``Config.validate``: ``pretrain.batch_size`` does not matter to ``toolkit
supervised`` on 500 images, so each command asks only about the sections it uses.
"""

from __future__ import annotations

import os

from toolkit.config.fields import ConfigError, _check
from toolkit.config.study import Config


MNIST_TRAIN_IMAGES = 60_000


def embedded_ray_cpus(cfg: Config) -> int | None:
    """Logical CPUs of the embedded local Ray this config starts, or None when it joins a cluster."""
    if not cfg.execution.embedded():
        return None
    return cfg.ray.num_cpus or max(4, os.cpu_count() or 1)


def check_command_config(cfg: Config, sections: tuple[str, ...] | None = None) -> Config:
    """Checks across sections that the config alone can decide, for a command that uses ``sections`` (None: all).

    Kept out of ``Config.validate`` because they concern only the commands that use the
    sections: ``pretrain.batch_size`` does not matter to ``toolkit supervised`` on 500 images.
    """
    uses = (lambda s: True) if sections is None else (lambda s: s in sections)
    n_train = min(cfg.data.train_subset or MNIST_TRAIN_IMAGES, MNIST_TRAIN_IMAGES)
    # MNIST's sizes are known without reading it; another dataset's are checked once it is read
    # (preflight: data_inputs.split_of, check_pretrain_batch)
    mnist = cfg.data.name == "mnist"
    if uses("split") and mnist:
        _check(cfg.split.val_size < n_train, "split.val_size",
               f"must be smaller than the {n_train} training images (data.train_subset)", cfg.split.val_size)
    if uses("pretrain") and mnist:
        # SimCLR sees the training images outside the validation split (at most pretrain.max_images)
        images = n_train - cfg.split.val_size
        if cfg.pretrain.max_images:
            images = min(images, cfg.pretrain.max_images)
        _check(cfg.pretrain.batch_size <= images, "pretrain.batch_size",
               f"must be at most the {images} images SimCLR trains on (data.train_subset, split.val_size, "
               "pretrain.max_images)", cfg.pretrain.batch_size)
    cpus = embedded_ray_cpus(cfg)
    if cpus is not None and uses("ray") and cfg.run.backend == "ray":
        need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
        if need > cpus:
            raise ConfigError(
                f"ray.num_workers={cfg.ray.num_workers} is not allowed: {cfg.ray.num_workers} workers x "
                f"{cfg.ray.cpus_per_worker:g} CPUs (ray.cpus_per_worker) need {need:g} CPUs but the embedded Ray has "
                f"{cpus} (ray.num_cpus); lower them or raise ray.num_cpus")
    if cpus is not None and uses("tune"):
        _check(cfg.trials.cpus <= cpus, "trials.cpus",
               f"must be at most the {cpus} CPUs of the embedded Ray (ray.num_cpus)", cfg.trials.cpus)
    return cfg

