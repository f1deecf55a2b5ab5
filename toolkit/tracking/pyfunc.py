"""The Python code of the toolkit's logged MLflow models (MLflow's "models from code").

MLflow runs this file when its own loaders open a toolkit model (``mlflow.pyfunc.load_model``,
``mlflow models serve``, ``mlflow models predict``), with the model's ``code/`` folder (a copy
of the ``toolkit`` package) first on ``sys.path``. The network is rebuilt from the model's
``weights.pt`` and ``toolkit_model.json`` (``toolkit.tracking.model_package``): nothing in the model is
unpickled. ``toolkit predict`` never runs this file; it reads those two files itself. Nothing in
the toolkit imports this module: it is MLflow's entry point, and ``set_model`` below is its
only effect.
"""

import mlflow
import numpy as np
import torch

from toolkit.tracking.model_package import DESCRIPTION, WEIGHTS, read


class ToolkitImageModel(mlflow.pyfunc.PythonModel):
    """uint8 images ``(N, C, S, S)`` (``(N, S, S)`` for a one-channel model; C, S: the model's input spec)
    -> float32 probabilities ``(N, num_classes)`` (or features, for an encoder)."""

    def load_context(self, context):
        self.model = read(context.artifacts[WEIGHTS], context.artifacts[DESCRIPTION])

    # np.ndarray: a hint MLflow infers no schema from (the logged tensor signature says what comes in),
    # and without any hint it warns on every load
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        # a served model gets the JSON's nested lists as the signature's uint8 array; copy: it may be read-only
        images = torch.from_numpy(np.array(model_input, dtype=np.uint8, copy=True))
        # a shape the network does not take is refused with the shape it takes (ValueError), not a conv error
        return self.model(images).numpy()


mlflow.models.set_model(ToolkitImageModel())
