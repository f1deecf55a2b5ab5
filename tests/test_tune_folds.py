"""`toolkit tune` in the strict protocol (``tune.objective=label_folds``): folds of the labeled images are the
only validation, so a search reads no label beyond them.

The pure folds are tested without Ray. The searches run real Ray Tune trials (Tune actors, separate
processes) on 2,000 real MNIST images: once on the real labels, once on a copy of the MNIST files whose
every training label outside the labeled set is shifted by one digit. The trials read the copy
from disk in their own processes, so this checks what Ray's workers read, not a patched driver.
The label-folds search must come out identical; a validation-objective search must not (which
shows that the poison reached the trials).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from toolkit.config import Config, ConfigError, load_config, to_yaml
from toolkit.datasets.folds import FOLD_KIND, check_folds, label_folds
from toolkit.datasets.mnist import load_mnist, make_split

SPACE = "pseudolabel.threshold_start: {uniform: [0.6, 0.95]}\nclassifier.lr: {loguniform: [1e-3, 1e-2]}\n"
TRAIN_SUBSET, VAL_SIZE = 2000, 200


# --------------------------------------------------------------------------- the folds, pure


def _split(labels: torch.Tensor, per_class: int = 5, seed: int = 3):
    return make_split(labels, per_class, 20, seed)


def test_folds_hold_out_each_labeled_image_once_stratified():
    labels = torch.arange(300) % 10
    split = _split(labels)
    folds = label_folds(split, labels, 5)
    held = torch.cat([f.val for f in folds])
    assert sorted(held.tolist()) == sorted(split.labeled.tolist())  # each labeled image is held out exactly once
    for f in folds:
        assert f.kind == FOLD_KIND and torch.equal(f.pool, split.pool)
        assert set(f.labeled.tolist()).isdisjoint(f.val.tolist())
        assert sorted(f.labeled.tolist() + f.val.tolist()) == sorted(split.labeled.tolist())
        assert torch.bincount(labels[f.val], minlength=10).tolist() == [1] * 10  # every class validated
    # 7 per class in 3 folds: sizes 23, 23, 24 (within one), and every fold keeps every class to train on
    split7 = _split(labels, 7)
    sizes = sorted(len(f.val) for f in label_folds(split7, labels, 3))
    assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 70
    assert all(torch.bincount(labels[f.labeled], minlength=10).min() >= 4 for f in label_folds(split7, labels, 3))


def test_folds_read_only_the_labeled_images_labels_and_follow_the_split_seed():
    labels = torch.arange(300) % 10
    split = _split(labels)
    other = labels.clone()
    outside = torch.ones(300, dtype=torch.bool)
    outside[split.labeled] = False
    other[outside] = (other[outside] + 1) % 10
    a, b = label_folds(split, labels, 5), label_folds(split, other, 5)
    assert all(torch.equal(x.val, y.val) and torch.equal(x.labeled, y.labeled) for x, y in zip(a, b))
    reseeded = dataclasses.replace(split, seed=4)  # the same labeled images, another seed: other folds
    assert any(not torch.equal(x.val, y.val) for x, y in zip(a, label_folds(reseeded, labels, 5)))


def test_more_folds_than_the_smallest_class_has_labels_is_a_config_error():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    check_folds(2, labels)
    with pytest.raises(ConfigError, match=r"tune.folds=3 is not allowed: the smallest class has 2"):
        check_folds(3, labels)
    with pytest.raises(ConfigError, match="tune.objective"):
        Config().replace(**{"tune.objective": "test_set"})


# --------------------------------------------------------------------------- real searches


def poisoned_copy(data_root: str, folder: Path, split_seed: int) -> str:
    """MNIST's four files under ``folder``/MNIST/raw, the training labels shifted by one digit except the labeled
    images' (of the split ``split_seed`` draws from the first TRAIN_SUBSET real labels); returns the new root."""
    raw, out = Path(data_root) / "MNIST" / "raw", folder / "MNIST" / "raw"
    out.mkdir(parents=True)
    for name in os.listdir(raw):
        if name != "train-labels-idx1-ubyte":
            os.symlink(raw / name, out / name)
    real = load_mnist(data_root, False, TRAIN_SUBSET, 300)
    labeled = make_split(real.train_labels, 10, VAL_SIZE, split_seed).labeled
    data = bytearray((raw / "train-labels-idx1-ubyte").read_bytes())
    labels = torch.tensor(list(data[8:]), dtype=torch.long)
    shifted = (labels + 1) % 10
    shifted[labeled] = labels[labeled]
    data[8:] = bytes(shifted.tolist())
    (out / "train-labels-idx1-ubyte").write_bytes(bytes(data))
    return str(folder)


def search_config(root: Path, data_root: str, **over) -> Config:
    root.mkdir(parents=True, exist_ok=True)
    (root / "space.yaml").write_text(SPACE)
    return Config().replace(**{
        "run.data_root": data_root, "data.train_subset": TRAIN_SUBSET, "data.test_subset": 300,
        "split.val_size": VAL_SIZE, "model.width": 8, "classifier.steps": 20, "classifier.eval_every": 20,
        "classifier.warmup_steps": 5, "classifier.batch_size": 32, "pseudolabel.rounds": 2,
        "pseudolabel.threshold_floor": 0.5,
        "tune.grace_rounds": 2,  # ASHA stops no trial: which one it stops depends on when results arrive
        "pseudolabel.steps_per_round": 10, "tune.space": str(root / "space.yaml"), "tune.num_samples": 2,
        "tune.objective": "label_folds", "tune.folds": 2, "trials.max_concurrent": 2, "trials.max_failures": 0,
        "run.device": "cpu", "run.threads": 1, "run.backend": "local", "inference.backend": "local",
        "run.output_dir": str(root / "runs"),
        "tracking.uri": f"sqlite:///{root}/mlflow.db", **over,
    })


def trials(result) -> list[tuple]:
    with (Path(result.model_path).parent / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    return sorted((r["pseudolabel.threshold_start"], r["classifier.lr"], r["val_acc"], r["rounds_done"]) for r in rows)


def _real_labels_split(monkeypatch, data_root: str) -> None:
    """The driver draws its split from the real labels (the copy's shifted ones would draw another): the
    split is the same, only what the code could read about the other images changes."""
    import toolkit.stages.data_inputs

    real = load_mnist(data_root, False, TRAIN_SUBSET, 300).train_labels
    monkeypatch.setattr(toolkit.stages.data_inputs, "make_split",
                        lambda labels, *a, **k: make_split(real[: len(labels)], *a, **k))


@pytest.mark.slow
def test_a_label_folds_search_reads_no_label_beyond_the_labeled_images(ray_session, tmp_path, data_root, monkeypatch):
    from toolkit.stages import tune as tune_stage
    from toolkit.stages.model_files import load_classifier_file
    from toolkit.stages.pseudolabel import pseudolabel

    poisoned_root = poisoned_copy(data_root, tmp_path / "poisoned-data", 0)
    honest_cfg = search_config(tmp_path / "honest", data_root)
    honest = tune_stage.tune(honest_cfg.study, honest_cfg.execution)
    with monkeypatch.context() as m:
        _real_labels_split(m, data_root)
        cfg = search_config(tmp_path / "poisoned", poisoned_root)
        poisoned = tune_stage.tune(cfg.study, cfg.execution)

    assert honest.metrics["trials_completed"] == 2 and honest.metrics["trials_failed"] == 0
    assert trials(honest) == trials(poisoned)
    assert honest.metrics["best_val_acc"] == poisoned.metrics["best_val_acc"] > 0.15
    # the best config retrained on all the labels: the same model, the same test figure
    assert honest.metrics["test_acc"] == poisoned.metrics["test_acc"]
    a, b = (load_classifier_file(r.model_path, torch.device("cpu")).state_dict() for r in (honest, poisoned))
    assert all(torch.equal(a[k], b[k]) for k in a)
    best = Path(honest.model_path).parent / tune_stage.BEST_FILE
    assert "2-fold labeled acc" in best.read_text() and "once per fold of the labeled images, 2 folds" in best.read_text()
    # the refit is the pseudolabel stage the pipeline runs next on best.yaml: found finished, not trained twice
    refit = pseudolabel(load_config(best, base=Config.of(honest_cfg.study)).study, honest_cfg.execution)
    assert refit.skipped
    c = load_classifier_file(refit.model_path, torch.device("cpu")).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    # each trial's run logs the split it searched: all 100 labeled images in 2 folds, no validation image
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=honest_cfg.tracking.uri)
    exp = client.get_experiment_by_name(honest_cfg.tracking.experiment).experiment_id
    trial_runs = client.search_runs([exp], filter_string="tags.`toolkit.command` = 'tune-trial'")
    assert len(trial_runs) == 2
    for r in trial_runs:
        assert (r.data.params["split.labeled_size"], r.data.params["split.val_size_actual"],
                r.data.params["split.label_folds"]) == ("100", "0", "2")

    # the same poison under the validation objective moves the trials' figures: it reached the Tune actors
    over = {"tune.objective": "validation", "tune.num_samples": 1, "pseudolabel.rounds": 1, "tune.grace_rounds": 1}
    honest_val_cfg = search_config(tmp_path / "honest-val", data_root, **over)
    honest_val = tune_stage.tune(honest_val_cfg.study, honest_val_cfg.execution)
    with monkeypatch.context() as m:
        _real_labels_split(m, data_root)
        cfg = search_config(tmp_path / "poisoned-val", poisoned_root, **over)
        poisoned_val = tune_stage.tune(cfg.study, cfg.execution)
    assert trials(honest_val) != trials(poisoned_val)


@pytest.mark.slow
def test_a_users_own_folder_is_searched_by_label_folds_only(ray_session, tmp_path, monkeypatch, capsys):
    from test_own_images import write_digits_folder
    from toolkit.cli import main
    from toolkit.stages import tune as tune_stage

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    write_digits_folder(tmp_path / "digits", labeled_per_class=3, unlabeled=120)
    over = {"data.name": "folder", "data.image_size": 16, "split.labels_per_class": 3, "tune.num_samples": 1,
            "data.train_subset": 0, "data.test_subset": 0, "pseudolabel.rounds": 1, "tune.grace_rounds": 1}
    cfg = search_config(tmp_path / "s", str(tmp_path / "digits"), **over)
    (tmp_path / "cfg.yaml").write_text(to_yaml(cfg, only_changed=True))
    for extra, words in ((["tune.objective=validation"], "use tune.objective=label_folds"),
                         (["tune.folds=4"], "tune.folds=4 is not allowed: the smallest class has 3 labeled images"),
                         (["tune.pool_subset=50"], "tune.pool_subset is not allowed with tune.objective=label_folds")):
        capsys.readouterr()
        assert main(["tune", "--config", str(tmp_path / "cfg.yaml"), *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("toolkit tune: error: ") and words in lines[0], lines
        assert not (tmp_path / "s" / "runs").exists() and not (tmp_path / "s" / "mlflow.db").exists()  # before anything
    named = cfg.execution.replace(**{"run.name": "mine"})
    result = tune_stage.tune(cfg.study, named)  # the images reach the Tune actor through the object store
    assert result.metrics["trials_completed"] == 1 and 0.0 <= result.metrics["best_val_acc"] <= 1.0
    assert Path(result.model_path).is_file()
    # the same run.name for another study: its saved search is not restored as this one's
    with pytest.raises(ConfigError, match="run.name='mine': .* holds a Tune search of another study"):
        tune_stage.tune(cfg.study.replace(**{"tune.folds": 3}), named)
