"""The labeled pool: one row per unlabeled image (its file, label, confidence, the teachers' agreement),
most doubtful first, so a person reviews the worst ones before anything else.

Written by the student (the pipeline's final model) to its stage folder and MLflow run as
``pool_labels.csv``, and copied by the pipeline to ``<run.output_dir>/pool_labels.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from toolkit.datasets.training_data import ImageData

FILE = "pool_labels.csv"
COLUMNS = ("file", "label", "confidence", "teachers_agree", "ensemble_label", "ensemble_confidence", "accepted_round",
           "index")


def pool_file_names(data: ImageData, pool: torch.Tensor) -> list[str]:
    """A name per pool image: its path below ``unlabeled/`` for a folder, its array and row for an npz
    (``images[17]``, ``unlabeled[3]``), else ``train:<row>`` (a benchmark's training image)."""
    if data.train_files is None:
        return [f"train:{int(i)}" for i in pool]
    names = [data.train_files[int(i)] for i in pool]
    return [n[len("unlabeled/"):] if n.startswith("unlabeled/") else n for n in names]


def accepted_rounds(teacher_file: str | Path) -> dict[int, int]:
    """{training row: the pseudo-labeling round that first accepted it} of an iterative teacher (read from the
    round state beside its model file); empty for a teacher without one (a supervised model)."""
    from toolkit.stages.pseudolabel_rounds import STATE_FILE, load_state

    state = load_state(Path(teacher_file).parent / STATE_FILE)
    out: dict[int, int] = {}
    if not state:
        return out
    start = 0
    for entry in state["history"]:  # each round appended its images to pseudo_indices in order
        for row in state["pseudo_indices"][start: start + entry["added"]]:
            out[int(row)] = int(entry["round"])
        start += entry["added"]
    return out


def write_pool_labels(path: Path, data: ImageData, pool: torch.Tensor, final_probs: torch.Tensor,
                      teacher_votes: torch.Tensor, ensemble: torch.Tensor, rounds: dict[int, int] | None = None) -> Path:
    """``path`` as CSV, one row per pool image, sorted by the final model's confidence, lowest first.

    ``final_probs`` (P, C): the final model's probabilities; ``teacher_votes`` (T, P): each teacher's
    label; ``ensemble`` (P, C): the teachers' (smoothed) mean the final model learned from; ``rounds``:
    ``accepted_rounds`` of the first teacher (the round column is empty for an image it never accepted).
    """
    conf, label = final_probs.max(1)
    agree = (teacher_votes == label.unsqueeze(0)).float().mean(0)
    e_conf, e_label = ensemble.max(1)
    names = pool_file_names(data, pool)
    order = torch.argsort(conf, stable=True).tolist()
    classes = data.class_names
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i in order:
            row = int(pool[i])
            w.writerow([names[i], classes[int(label[i])], f"{float(conf[i]):.6f}", f"{float(agree[i]):.4f}",
                        classes[int(e_label[i])], f"{float(e_conf[i]):.6f}", (rounds or {}).get(row, ""), row])
    tmp.replace(path)
    return path
