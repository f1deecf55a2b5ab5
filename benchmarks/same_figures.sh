#!/bin/bash
# The same tiny MNIST pipeline on an earlier commit and on this checkout: every figure it prints (test and
# validation accuracies, SimCLR losses, pseudo-labels added, their precision, the student's labels) must agree
# to the last printed digit. Stage keys may differ (they hash the study's sections, which gain keys); figures
# may not. Usage, from the repository root:  bash benchmarks/same_figures.sh 80d581b
set -euo pipefail
base=${1:?give the commit to compare with}
repo=$(pwd)
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/base" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add --detach "$work/base" "$base" >/dev/null
export MLFLOW_DISABLE_TELEMETRY=true RAY_DATA_DISABLE_PROGRESS_BARS=1
args=(run.backend=local run.device=cpu run.threads=1 data.train_subset=3000 data.test_subset=500 split.val_size=200
      model.width=8 pretrain.epochs=1 classifier.steps=40 classifier.eval_every=20 pseudolabel.rounds=2
      pseudolabel.steps_per_round=40 student.steps=40 'pipeline.seeds=[0]' tracking.enabled=false)
for tree in "$work/base" "$repo"; do
  name=$(basename "$tree")
  (cd "$tree" && PYTHONPATH="$tree" "$repo/.venv/bin/python" -m toolkit.cli pipeline "${args[@]}" \
     run.output_dir="$work/out-$name" > "$work/$name.log" 2>&1)
  grep -o "\(test\|val\) acc [0-9.]*\|precision [0-9.]*\|+[0-9]* \|loss [0-9.]*\|[0-9]* ensemble labels" \
     "$work/$name.log" > "$work/$name.figures"
done
if diff "$work/base.figures" "$work/$(basename "$repo").figures"; then
  echo "identical: $(wc -l < "$work/base.figures") figures"
else
  echo "the figures differ (above)"; exit 1
fi
