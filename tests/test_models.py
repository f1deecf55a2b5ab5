"""The networks (shapes for every architecture knob) and model files (round trip, mismatches, weights_only)."""

from __future__ import annotations

import inspect
import random
from pathlib import Path

import pytest
import torch

from toolkit.datasets.spec import ImageSpec
from torch import nn

from toolkit.engine import checkpoints
from toolkit.maths import models
from toolkit.engine.checkpoints import CheckpointError, load, load_model_file, model_config_of, model_payload, save
from toolkit.config import ModelConfig, Study
from toolkit.maths.models import Classifier, Encoder, ProjectionHead, SimCLRModel, architecture


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _cfg(**model) -> Study:
    return Study().replace(**{f"model.{k}": v for k, v in model.items()})


# --- shapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("convs", [1, 3])
def test_shapes(width, depth, convs):
    mc = ModelConfig(width=width, depth=depth, convs_per_stage=convs, proj_dim=12, proj_hidden=20)
    enc = Encoder(width, depth, convs)
    assert enc.feature_dim == width * 2 ** (depth - 1)
    x = _x(3)
    assert enc(x).shape == (3, enc.feature_dim)
    assert Classifier(mc)(x).shape == (3, 10)
    assert SimCLRModel(mc)(x).shape == (3, 12)
    # stage 0 has one conv, later stages convs_per_stage; depth - 1 poolings
    n_conv = sum(isinstance(m, nn.Conv2d) for m in enc.modules())
    assert n_conv == 1 + (depth - 1) * convs
    assert sum(isinstance(m, nn.MaxPool2d) for m in enc.modules()) == depth - 1
    widths = [m.out_channels for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert widths[0] == width and widths[-1] * enc.pool.output_size**2 == enc.feature_dim


def test_default_feature_dim():
    assert Encoder().feature_dim == 128  # global pooling
    # the config default pools the last stage to 2 x 2 cells: 128 channels x 4
    assert SimCLRModel(ModelConfig()).encoder.feature_dim == 512


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_pooled_layout_features(pool):
    enc = Encoder(8, 3, 1, pool)
    assert enc(_x(2)).shape == (2, 32 * pool * pool)


def test_projection_head_and_classifier_parts():
    mc = ModelConfig(width=8, proj_dim=5, proj_hidden=7)
    m = SimCLRModel(mc)
    assert isinstance(m.projector, ProjectionHead)
    assert m.projector(torch.randn(4, m.encoder.feature_dim)).shape == (4, 5)
    c = Classifier(mc, ImageSpec(num_classes=3))
    assert c(_x(2)).shape == (2, 3)
    assert c.dropout.p == mc.dropout


def test_single_image_in_eval_mode():
    for m in (Classifier(ModelConfig(width=8)), SimCLRModel(ModelConfig(width=8))):
        assert m.eval()(_x(1)).shape[0] == 1


def test_kinds():
    # the names model files record and checkpoints.load_model_file checks
    assert (SimCLRModel.kind, Classifier.kind) == ("simclr", "classifier")


def test_architecture_holds_the_shape_fields():
    mc = ModelConfig(width=16, depth=2, convs_per_stage=2, proj_dim=8, proj_hidden=9, dropout=0.3)
    assert architecture(mc) == {"name": "cnn", "width": 16, "depth": 2, "convs_per_stage": 2, "pool": 2, "proj_dim": 8, "proj_hidden": 9}


def test_inputs_are_standardised_inside_the_model():
    # same weights, inputs in [0, 1]: the first conv sees (x - mean) / std
    enc = Encoder(8, 2, 1).eval()
    first = enc.body[0][0]
    x = _x(2)
    expected = first((x - models.MNIST_MEAN) / models.MNIST_STD)
    got = {}
    first.register_forward_hook(lambda m, i, o: got.setdefault("out", o))
    enc(x)
    torch.testing.assert_close(got["out"], expected)


def test_deterministic_init_under_a_seed():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = Classifier(ModelConfig(width=8))
        torch.manual_seed(0)
        b = Classifier(ModelConfig(width=8))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# --- no device code --------------------------------------------------------------------------------


def test_models_have_no_device_or_distributed_code():
    src = inspect.getsource(models)
    for word in ("cuda", ".to(", "torch.distributed", "import ray", "import mlflow", "device="):
        assert word not in src, word


@pytest.mark.parametrize("make", [SimCLRModel, Classifier])
def test_model_to_meta_and_double(make):
    m = make(ModelConfig(width=8)).to("meta")
    assert all(p.is_meta for p in m.parameters())
    assert m(torch.empty(4, 1, 28, 28, device="meta")).is_meta
    d = make(ModelConfig(width=8)).to(torch.float64)
    assert d(_x(2).double()).dtype == torch.float64


def test_channels_last_gives_the_same_output():
    m = Classifier(ModelConfig(width=8)).eval()
    x = _x(3)
    ref = m(x)
    out = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    # other conv kernels (oneDNN picks them per memory format and CPU): float32 rounding only,
    # seen 2e-8 on logits ~0.1; a layout mix-up scrambles pixels and changes logits by ~0.1
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_model_on_cuda():
    m = Classifier(ModelConfig(width=8)).cuda().eval()
    assert m(_x(2).cuda()).is_cuda


# --- model files -----------------------------------------------------------------------------------


def _save_model(path: Path, kind: str, cfg: Study, **extra) -> tuple[Path, nn.Module]:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = {"simclr": SimCLRModel, "classifier": Classifier}[kind](cfg.model)
    # non-trivial BatchNorm buffers, so that the round trip covers them
    model.train()(_x(8, seed=3))
    return save(path, model_payload(kind, cfg.to_dict(), model.state_dict(), **extra)), model


def test_classifier_round_trip(tmp_path):
    cfg = _cfg(width=8, depth=2, convs_per_stage=2)
    path, model = _save_model(tmp_path / "run" / "model.pt", "classifier", cfg, epoch=3, val_acc=0.5)
    assert path == tmp_path / "run" / "model.pt"
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # atomic write left no temp file
    payload = load_model_file(path, "classifier", cfg.model)
    assert payload["kind"] == "classifier"
    assert payload["architecture"] == architecture(cfg.model)
    assert payload["path"] == str(path)
    assert (payload["epoch"], payload["val_acc"]) == (3, 0.5)
    assert payload["config"] == cfg.to_dict()  # the study sections that made it
    assert model_config_of(payload) == cfg.model
    sd = model.state_dict()
    assert set(payload["state_dict"]) == set(sd)
    for k, v in sd.items():
        assert payload["state_dict"][k].device.type == "cpu"
        assert torch.equal(payload["state_dict"][k], v), k
    fresh = Classifier(model_config_of(payload))
    fresh.load_state_dict(payload["state_dict"])
    x = _x(5, seed=9)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_model_config_of_a_file_from_another_version(tmp_path):
    # a model file whose config names a model key this version does not know still gives its ModelConfig
    cfg = _cfg(width=8, depth=2)
    payload = model_payload("classifier", cfg.to_dict(), {})
    payload["config"]["model"]["retired_knob"] = 3
    assert model_config_of(payload) == cfg.model
    # ModelWeights.config (the config alone, as weights travel to Ray actors), wrapped as inference does
    assert model_config_of({"config": payload["config"]}) == cfg.model
    # a file from before `pool` existed: its architecture has no pool, and it was global pooling
    del payload["architecture"]["pool"]
    assert model_config_of(payload).pool == 1


def test_load_from_a_folder(tmp_path):
    cfg = _cfg(width=8)
    _save_model(tmp_path / "stage" / checkpoints.MODEL_FILE, "simclr", cfg)
    assert load_model_file(tmp_path / "stage", "simclr", cfg.model)["path"] == str(tmp_path / "stage" / "model.pt")
    _save_model(tmp_path / "ckpt" / checkpoints.CHECKPOINT_FILE, "classifier", cfg)
    assert load(tmp_path / "ckpt")["kind"] == "classifier"


def test_save_overwrites(tmp_path):
    cfg = _cfg(width=8)
    path = tmp_path / "model.pt"
    save(path, model_payload("classifier", cfg.to_dict(), {}, epoch=1))
    save(path, model_payload("classifier", cfg.to_dict(), {}, epoch=2))
    assert load(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_payload_detaches_and_moves_to_cpu():
    w = torch.ones(2, requires_grad=True) * 2
    payload = model_payload("classifier", Study().to_dict(), {"w": w})
    assert not payload["state_dict"]["w"].requires_grad
    assert payload["config"] == Study().to_dict()


def test_simclr_file_as_classifier(tmp_path):
    cfg = _cfg(width=8)
    path, _ = _save_model(tmp_path / "model.pt", "simclr", cfg)
    with pytest.raises(CheckpointError) as e:
        load_model_file(path, "classifier", cfg.model)
    msg = str(e.value)
    assert str(path) in msg and "'simclr'" in msg and "'classifier'" in msg


def test_width_mismatch(tmp_path):
    path, _ = _save_model(tmp_path / "model.pt", "classifier", _cfg(width=16))
    with pytest.raises(CheckpointError) as e:
        load_model_file(path, "classifier", _cfg(width=8).model)
    msg = str(e.value)
    assert str(path) in msg
    assert "model.width=16 in the checkpoint but 8 here" in msg
    assert "depth" not in msg  # only what differs


def test_depth_and_convs_mismatch(tmp_path):
    path, _ = _save_model(tmp_path / "model.pt", "simclr", _cfg(width=8, depth=3, convs_per_stage=1))
    with pytest.raises(CheckpointError) as e:
        load_model_file(path, "simclr", _cfg(width=8, depth=2, convs_per_stage=2).model)
    msg = str(e.value)
    assert "model.depth=3 in the checkpoint but 2 here" in msg
    assert "model.convs_per_stage=1 in the checkpoint but 2 here" in msg


def test_no_model_config_skips_the_architecture_check(tmp_path):
    path, _ = _save_model(tmp_path / "model.pt", "classifier", _cfg(width=16))
    assert load_model_file(path, "classifier")["architecture"]["width"] == 16


def test_settings_that_do_not_change_shapes_load(tmp_path):
    path, _ = _save_model(tmp_path / "model.pt", "classifier", _cfg(width=8, dropout=0.0))
    load_model_file(path, "classifier", _cfg(width=8, dropout=0.5, init="simclr:x").model)


# --- unreadable and hostile files ------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as e:
        load_model_file(tmp_path / "nope.pt", "classifier")
    assert str(tmp_path / "nope.pt") in str(e.value)


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", random.Random(0).randbytes(1000)], ids=["empty", "text", "random"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_model_file(path, "classifier")
    msg = str(e.value)
    assert str(path) in msg and "not a readable toolkit checkpoint" in msg
    assert "\n" not in msg  # one line for the CLI


def test_truncated_checkpoint(tmp_path):
    path, _ = _save_model(tmp_path / "model.pt", "classifier", _cfg(width=8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable toolkit checkpoint") as e:
        load_model_file(path, "classifier")
    assert str(path) in str(e.value)


@pytest.mark.parametrize("obj", [
    {"state_dict": {}},
    {"kind": "classifier"},
    torch.zeros(3),
    [1, 2, 3],
], ids=["no-kind", "no-state", "tensor", "list"])
def test_readable_but_not_a_toolkit_checkpoint(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a toolkit checkpoint") as e:
        load_model_file(path, "classifier")
    assert str(path) in str(e.value)


def test_plain_state_dict_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(Classifier(ModelConfig(width=8)).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a toolkit checkpoint"):
        load_model_file(path, "classifier")


class _Exploit:
    """Unpickling this object calls ``_touch(marker)``: arbitrary code on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path: str) -> str:
    Path(path).write_text("pwned")
    return path


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    payload = model_payload("classifier", _cfg(width=8).to_dict(), {})
    payload["evil"] = _Exploit(marker)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="not a readable toolkit checkpoint") as e:
        load_model_file(path, "classifier")
    assert str(path) in str(e.value)
    assert not marker.exists(), "the file's code ran while loading"
    # the file really is hostile: without weights_only it runs code
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_torch_load_is_called_with_weights_only(tmp_path, monkeypatch):
    path, _ = _save_model(tmp_path / "model.pt", "classifier", _cfg(width=8))
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model_file(path, "classifier")
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    assert all(str(kw.get("map_location")) == "cpu" for kw in calls)


def test_a_colour_spec_builds_networks_for_its_images():
    """Channels, side, classes and statistics come from the spec: 3x32x32 colour in, 4 classes out, and the
    statistics are buffers the state dict does not hold (an MNIST file's keys are unchanged)."""
    spec = ImageSpec(3, 32, 4, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    c = Classifier(ModelConfig(width=8), spec)
    assert c(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert torch.equal(c.encoder.mean.flatten(), torch.tensor(spec.mean))
    assert not any(k.endswith(("mean", "std")) and "bn" not in k and "running" not in k for k in c.state_dict())
    assert set(Classifier(ModelConfig(width=8)).state_dict()) == set(c.state_dict())


def test_mnist_networks_standardise_with_mnist_statistics():
    x = torch.rand(3, 1, 28, 28)
    enc = Classifier(ModelConfig(width=8)).encoder
    torch.testing.assert_close(enc.body((x - 0.1307) / 0.3081), enc.body((x - enc.mean) / enc.std))
