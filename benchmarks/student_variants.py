"""Student variants trained on the teachers of a finished pipeline run, over its split seeds, in one run.

    python benchmarks/student_variants.py RUN_DIR OUT_DIR [--seeds 0,1,2]
        [--teachers scratch|both|second] [--profile launch/configs/cpu.yaml] [key=value ...]

RUN_DIR is a pipeline's ``run.output_dir`` (its ``stages/`` holds the SimCLR encoder, the
iterative pseudo-labelers and the students, each folder with its ``config.yaml``). For each
seed this calls the pipeline's own ``toolkit.stages.student.student`` with teachers taken
from RUN_DIR and the profile plus ``key=value`` overrides (e.g. ``student.steps=1200``,
``student.knn_k=0``, ``pseudolabel.labeled_fraction=0.05``):

- ``scratch``: the scratch iterative model alone (what the cpu profile's pipeline does);
- ``both``: it and the SimCLR-initialised iterative model (the gpu profile's pipeline);
- ``second``: a second generation, the run's own student relabels the pool for a new one.

Nothing is logged to MLflow; stages land in OUT_DIR (re-running skips finished ones). The
test set only reports; validation accuracy is printed beside it, and the labels' precision
against the pool's hidden labels is a diagnostic. Writes ``OUT_DIR/student_variants.json``
and prints a table with mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.config import load_config  # noqa: E402
from toolkit.stages.skeleton import finished_result  # noqa: E402
from toolkit.stages.report import mean_std_text  # noqa: E402
from toolkit.stages.student import student  # noqa: E402

PROFILE = Path(__file__).resolve().parents[1] / "launch" / "configs" / "cpu.yaml"


def stage_models(stages: Path, prefix: str) -> list[tuple[dict, str]]:
    """(config, model file) of each stage folder ``<prefix>-*`` under ``stages`` that the
    pipeline itself would count as finished (``finished_result``: its result saved, its model readable)."""
    found = []
    for folder in sorted(stages.glob(f"{prefix}-*")):
        done = finished_result(folder)
        if done is not None and done.model_path:
            found.append((yaml.safe_load((folder / "config.yaml").read_text()), done.model_path))
    return found


def _first(models: list[str], what: str, seed: int, stages: Path) -> str:
    if not models:
        sys.exit(f"error: no finished {what} for split seed {seed} in {stages}")
    return models[0]


def teachers_for(stages: Path, seed: int, which: str) -> list[str]:
    """The model files that teach seed ``seed``'s student variant ``which``."""
    if which == "second":
        students = [m for c, m in stage_models(stages, "student") if c["split"]["seed"] == seed]
        return [_first(students, "student", seed, stages)]
    iterative = [(c, m) for c, m in stage_models(stages, "pseudolabel-iterative") if c["split"]["seed"] == seed]
    scratch = [m for c, m in iterative if c["model"]["init"] == "scratch"]
    teachers = [_first(scratch, "scratch iterative stage", seed, stages)]
    if which == "both":
        simclr = [m for c, m in iterative if c["model"]["init"].startswith("simclr:")]
        teachers.append(_first(simclr, "SimCLR-initialised iterative stage", seed, stages))
    return teachers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2],
                    help="split seeds, comma-separated")
    ap.add_argument("--teachers", choices=("scratch", "both", "second"), default="scratch")
    ap.add_argument("--profile", type=Path, default=PROFILE)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides of the student")
    args = ap.parse_intermixed_args()  # overrides may follow the options

    stages = args.run_dir / "stages"
    encoders = stage_models(stages, "pretrain")
    if not encoders:
        sys.exit(f"error: no finished SimCLR encoder in {stages}")
    encoder = encoders[0][1]  # the pipeline pretrains one encoder for all its seeds
    rows = []
    for seed in args.seeds:
        cfg = load_config(str(args.profile), args.overrides + [
            f"split.seed={seed}", f"model.seed={seed}", "tracking.enabled=false", f"run.output_dir={args.out_dir}"])
        teachers = teachers_for(stages, seed, args.teachers)
        t0 = time.time()
        result = student(cfg.study, cfg.execution, teachers, encoder=encoder)
        m = result.metrics
        rows.append({"seed": seed, "test_acc": m["test_acc"], "val_acc": m["val_acc"],
                     "label_precision": m.get("diagnostic/pseudo_precision_total"), "seconds": time.time() - t0})
        print(f"seed {seed}: test {m['test_acc']:.2%}  val {m['val_acc']:.2%}", flush=True)

    summary = {"teachers": args.teachers, "overrides": args.overrides, "run_dir": str(args.run_dir), "seeds": rows,
               "test_acc": mean_std_text([r["test_acc"] for r in rows]),
               "val_acc": mean_std_text([r["val_acc"] for r in rows])}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "student_variants.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n| student ({args.teachers}; {' '.join(args.overrides) or 'profile defaults'}) | test | val |")
    print("| --- | ---: | ---: |")
    for r in rows:
        print(f"| seed {r['seed']} | {r['test_acc']:.2%} | {r['val_acc']:.2%} |")
    print(f"| mean ± std | {summary['test_acc']} | {summary['val_acc']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
