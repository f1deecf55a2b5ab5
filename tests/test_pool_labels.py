"""The labeled pool table: one row per pool image, most doubtful first, named as the user names the files,
with the round that accepted each image."""

from __future__ import annotations

import csv

import torch

from toolkit.datasets.training_data import ImageData


def _data(files=None) -> ImageData:
    n = 6
    return ImageData(torch.zeros(n, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, -1, -1, -1, -1]),
                     torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                     class_names=("cat", "dog"), kind="real", name="folder", train_files=files)


def test_rows_are_sorted_by_doubt_and_named_by_file(tmp_path):
    from toolkit.stages.pool_labels import write_pool_labels

    files = ("labeled/cat/a.png", "labeled/dog/b.png", "unlabeled/x.png", "unlabeled/sub/y.png", "unlabeled/z.png",
             "unlabeled/w.png")
    pool = torch.tensor([2, 3, 4, 5])
    final = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.55, 0.45], [0.2, 0.8]])
    votes = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])  # two teachers
    ensemble = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    path = write_pool_labels(tmp_path / "pool_labels.csv", _data(files), pool, final, votes, ensemble, {2: 1, 5: 3})
    rows = list(csv.DictReader(path.open()))
    assert [r["file"] for r in rows] == ["z.png", "sub/y.png", "w.png", "x.png"]  # confidence 0.55, 0.6, 0.8, 0.9
    assert [r["label"] for r in rows] == ["cat", "dog", "dog", "cat"]
    assert [float(r["teachers_agree"]) for r in rows] == [0.5, 1.0, 0.5, 1.0]
    assert [r["accepted_round"] for r in rows] == ["", "", "3", "1"]
    assert [int(r["index"]) for r in rows] == [4, 3, 5, 2]


def test_accepted_rounds_follow_the_round_state(tmp_path):
    from toolkit.stages.pool_labels import accepted_rounds
    from toolkit.stages.pseudolabel_rounds import STATE_FILE, STATE_KIND, save_state

    state = {"kind": STATE_KIND, "state_dict": {}, "pseudo_indices": [10, 4, 7, 9, 2], "pseudo_labels": [0, 1, 0, 1, 1],
             "history": [{"round": 1, "added": 2}, {"round": 2, "added": 0}, {"round": 3, "added": 3}]}
    save_state(tmp_path / STATE_FILE, state)
    assert accepted_rounds(tmp_path / "model.pt") == {10: 1, 4: 1, 7: 3, 9: 3, 2: 3}
    assert accepted_rounds(tmp_path / "elsewhere" / "model.pt") == {}
