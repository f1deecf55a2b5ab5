"""Exploration diagnostic behind `student.smooth_space=pixels` (digits, exploration split seeds only).

    python benchmarks/digits_smoothing_diag.py --work /tmp/digits-explore2 --seeds 10 11 12 13

Reads a ``benchmarks/digits_folder.py --keep-out`` work folder after a run of
``launch/configs/digits.yaml``: per seed, the finished iterative pseudo-labelers (the student's
teachers, without consistency training), the SimCLR encoder, the folder and ``truth.csv``. It
averages the teachers' pool probabilities and scores, against the held-back truth, that average
smoothed as the student smooths it (``knn_smooth``, the labeled images as certain rows) in the
SimCLR embedding or by the images' own pixels, for k in 5, 7, 10, and with a few steps of label
propagation (each step smooths again and mixes the teachers' average back in with weight
1 - alpha). It reads the pool's truth, so it may only ever run on exploration seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.config import load_config  # noqa: E402
from toolkit.datasets.training_data import load_image_data, real_split  # noqa: E402
from toolkit.engine.loops import extract_features, predict_probs  # noqa: E402
from toolkit.maths.selection import knn_smooth  # noqa: E402
from toolkit.stages.model_files import load_classifier_file, load_encoder  # noqa: E402

PROFILE = Path(__file__).resolve().parents[1] / "launch" / "configs" / "digits.yaml"


def seed_inputs(work: Path, seed: int):
    """(data, split, truth by file, teachers' mean pool probabilities, labeled one-hot rows, SimCLR feats, pixels)."""
    folder = work / f"seed{seed}"
    stages = folder / "out" / "stages"
    cfg = load_config(PROFILE).replace(**{"data.name": "folder", "run.data_root": str(folder / "data")})
    data = load_image_data(cfg.study.data, str(folder / "data"), False)
    split = real_split(data.train_labels, cfg.study.split.labels_per_class, data.spec.num_classes, data.class_names)
    with (folder / "truth.csv").open() as f:
        truth = {r["file"]: int(r["label"]) for r in csv.DictReader(f)}
    teachers = [f / "model.pt" for f in sorted(stages.glob("pseudolabel-iterative-*"))
                if (f / "result.json").is_file()
                and yaml.safe_load((f / "config.yaml").read_text()).get("consistency", {}).get("weight", 0) == 0]
    cpu = torch.device("cpu")
    pool_images = data.train_images[split.pool]
    mean = torch.stack([predict_probs(load_classifier_file(t, cpu), pool_images) for t in teachers]).mean(0)
    known = F.one_hot(data.train_labels[split.labeled], data.spec.num_classes).float()
    images = data.train_images[torch.cat([split.labeled, split.pool])]
    feats = extract_features(load_encoder(next(stages.glob("pretrain-*")) / "model.pt", cpu), images)
    return data, split, truth, mean, known, feats, images.flatten(1).float()


def accuracy(data, split, truth: dict, probs: torch.Tensor) -> float:
    right = 0
    for i, p in zip(split.pool.tolist(), probs.argmax(1).tolist()):
        right += int(data.class_names[p]) == truth[str(data.train_files[i]).split("unlabeled/")[-1]]
    return right / len(split.pool)


def propagate(table: torch.Tensor, feats: torch.Tensor, k: int, known: int, steps: int, alpha: float) -> torch.Tensor:
    p0, p = table.clone(), table.clone()
    for _ in range(steps):
        p = alpha * knn_smooth(p, feats, k) + (1 - alpha) * p0
        p[:known] = p0[:known]
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    scores: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        data, split, truth, mean, known, feats, pixels = seed_inputs(args.work, seed)
        table = torch.cat([known, mean])
        n = len(known)
        row = {"teachers' mean": accuracy(data, split, truth, mean)}
        for space, f in (("simclr", feats), ("pixels", pixels)):
            for k in (5, 7, 10):
                row[f"{space} k={k}"] = accuracy(data, split, truth, knn_smooth(table, f, k)[n:])
                for steps, alpha in ((3, 0.9), (10, 0.9)):
                    row[f"{space} k={k}, {steps} steps, alpha {alpha}"] = accuracy(
                        data, split, truth, propagate(table, f, k, n, steps, alpha)[n:])
        scores[seed] = row
        print(seed, json.dumps({k: round(100 * v, 2) for k, v in row.items()}), flush=True)
    print("| smoothing | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for name in scores[args.seeds[0]]:
        vals = [100 * scores[s][name] for s in args.seeds]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.2f} |")


if __name__ == "__main__":
    main()
