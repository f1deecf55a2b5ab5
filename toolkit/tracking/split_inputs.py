"""The labeled / validation / pool split as an MLflow run's dataset inputs (``tracking.logged_models`` re-exports these)."""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

import numpy as np
import torch

from toolkit.datasets.mnist import NUM_CLASSES


def split_digest(split) -> str:
    """A stable 8-hex digest of a split's index arrays (same split -> same digest everywhere)."""
    h = hashlib.sha256()
    for part in (split.labeled, split.val, split.pool):
        h.update(np.asarray(part.cpu() if isinstance(part, torch.Tensor) else part, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:8]


def log_split_dataset(target: Any, run_id: str, split, name: str | None = None, digest: str | None = None,
                      source: str | None = None) -> list[str]:
    """Log the labeled / validation / pool split as the run's MLflow dataset inputs.

    Two datasets, both built with ``mlflow.data.from_numpy`` from the split's index arrays into
    the MNIST training images: ``<name>`` (``labeled`` and ``pool`` indices, context
    ``training``) and ``<name>-val`` (``val``, context ``validation``). Their profile and the
    input tags hold the sizes (``labeled``, ``val``, ``pool``), the split seed and labels per
    class. ``name`` defaults to ``mnist-seed<seed>-<labels_per_class>x10``, ``digest`` to
    ``split_digest(split)``; ``source`` (e.g. the MNIST folder) is recorded as the dataset source.
    Logging the same split again (a resumed run) adds nothing. Returns the two dataset names.
    """
    # here, not at the top: logged_models imports this module at its end
    from toolkit.tracking.logged_models import _client, _disabled, _uri_of, using_tracking_uri

    if _disabled(target):
        return []
    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag

    uri = _uri_of(target)
    name = name or f"mnist-seed{split.seed}-{split.labels_per_class}x{NUM_CLASSES}"
    digest = digest or split_digest(split)

    def arr(t) -> np.ndarray:
        return np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=np.int64)

    sizes = {"labeled": len(split.labeled), "val": len(split.val), "pool": len(split.pool)}
    about = {**sizes, "seed": int(split.seed), "labels_per_class": int(split.labels_per_class),
             "indices_into": "MNIST training images"}
    parts = (
        (name, {"labeled": arr(split.labeled), "pool": arr(split.pool)}, "training"),
        (f"{name}-val", {"val": arr(split.val)}, "validation"),
    )
    inputs = []
    with using_tracking_uri(uri):  # from_numpy without a source resolves one from the fluent context
        for ds_name, features, context in parts:
            with warnings.catch_warnings():  # a local folder "can be interpreted in multiple ways" (all local)
                warnings.simplefilter("ignore", UserWarning)
                ds = mlflow.data.from_numpy(features, source=source, name=ds_name, digest=digest)
            entity = ds._to_mlflow_entity()
            profile = {**about, **json.loads(entity.profile or "{}")}
            entity = Dataset(name=entity.name, digest=entity.digest, source_type=entity.source_type,
                             source=entity.source, schema=entity.schema, profile=json.dumps(profile))
            tags = [InputTag(key="mlflow.data.context", value=context)]
            tags += [InputTag(key=f"toolkit.{k}", value=str(v)) for k, v in sizes.items()]
            inputs.append(DatasetInput(dataset=entity, tags=tags))
    client = _client(uri)
    have = {(d.dataset.name, d.dataset.digest) for d in client.get_run(run_id).inputs.dataset_inputs}
    new = [d for d in inputs if (d.dataset.name, d.dataset.digest) not in have]
    if new:
        client.log_inputs(run_id, datasets=new)
    return [p[0] for p in parts]
