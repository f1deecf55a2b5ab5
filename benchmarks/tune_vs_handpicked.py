"""Tuned against hand-picked pseudo-labeling schedule over several split seeds, in one run.

    python benchmarks/tune_vs_handpicked.py OUT_DIR [--seeds 0 1 2] [key=value ...]

For each split seed: `toolkit tune` with ``launch/configs/tune_cpu.yaml`` (8 trials on the
whole pool, the first being the hand-picked schedule, ASHA on validation accuracy), then
the search's ``best.yaml`` and the hand-picked config each train once more under the same
conditions (in-process, one torch thread, in-process pool inference: as the trials ran).
The search sees validation labels only (standard protocol); the test set only reports.
When the search hands back the hand-picked schedule itself (``tune.include_base``), both
arms are one stage key and the second is the first's finished result, not a second run.
Writes ``OUT_DIR/tune_vs_handpicked.json`` and prints a table with mean ± std over seeds.
Every stage resumes: re-running the same command skips what is finished (and then the
recorded ``tune_seconds`` is the time to find the finished search, not to run it).
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
from toolkit.stages.pseudolabel import pseudolabel  # noqa: E402
from toolkit.stages.report import mean_std_text  # noqa: E402
from toolkit.stages.tune import best_config_path, tune  # noqa: E402

PROFILE = Path(__file__).resolve().parents[1] / "launch" / "configs" / "tune_cpu.yaml"
# the trials' own conditions, for the final trainings of both arms
SAME_AS_TRIALS = ["run.backend=local", "inference.backend=local", "run.threads=1"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args, overrides = ap.parse_known_args()
    out = Path(args.out_dir).resolve()
    rows = []
    for seed in args.seeds:
        common = overrides + [f"split.seed={seed}", f"model.seed={seed}", f"run.output_dir={out / f'seed{seed}'}",
                              "tune.pool_subset=0"]
        base = load_config(PROFILE, common)
        t0 = time.perf_counter()
        searched = tune(base.study, base.execution)
        tune_s = time.perf_counter() - t0
        # best.yaml holds every result key that differs from a default run (not data.*, no execution
        # key): loaded onto the defaults, as `toolkit pseudolabel --config best.yaml` would
        best = best_config_path(searched)
        tuned_cfg = load_config(best, overrides + [f"split.seed={seed}", f"model.seed={seed}",
                                f"run.output_dir={out / f'seed{seed}'}"] + SAME_AS_TRIALS)
        hand_cfg = load_config(PROFILE, common + SAME_AS_TRIALS)
        tuned = pseudolabel(tuned_cfg.study, tuned_cfg.execution)
        hand = pseudolabel(hand_cfg.study, hand_cfg.execution)
        rows.append({
            "seed": seed, "tune_seconds": tune_s,
            "tuned": {"val_acc": tuned.metrics["val_acc"], "test_acc": tuned.metrics["test_acc"],
                      "config": yaml.safe_load(best.read_text())},  # the searched keys and what they changed
            "hand_picked": {"val_acc": hand.metrics["val_acc"], "test_acc": hand.metrics["test_acc"]},
        })
        (out / "tune_vs_handpicked.json").write_text(json.dumps(rows, indent=2))
    print("| schedule | val acc (objective) | test acc | per seed (test) |")
    print("| --- | ---: | ---: | --- |")
    for arm in ("hand_picked", "tuned"):
        val = [r[arm]["val_acc"] for r in rows]
        test = [r[arm]["test_acc"] for r in rows]
        per = " / ".join(f"{100 * t:.2f}" for t in test)
        print(f"| {arm.replace('_', '-')} | {mean_std_text(val)} | {mean_std_text(test)} | {per} |")
    gain = [r["tuned"]["test_acc"] - r["hand_picked"]["test_acc"] for r in rows]
    print(f"tuned - hand-picked, test: {mean_std_text(gain).rstrip('%')} points "
          f"(per seed: {', '.join(f'{100 * g:+.2f}' for g in gain)})")
    print(f"wrote {out / 'tune_vs_handpicked.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
