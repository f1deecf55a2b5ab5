"""The fault half of `edge_check.py`: signals, kills, damaged files, a second writer, a full or
read-only disk, lost Ray workers, each through the real `toolkit` command on tiny settings.

A scenario lists its expectations as it checks them; it "survived" when all held. Settings
are those of tests/test_faults.py (1,500 images, width 8, batch 128: ~10 steps an epoch).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_check import Outcome, Proc, run_cli
from edge_fault_tools import (Checks, Ctx, checkpoints_in, kill_tree, one_line, ray_registered, ray_workers, rerun_resumes,
                              the_run)

TUNE_SPACE = "pseudolabel.threshold_start: {uniform: [0.9, 0.99]}\n"

# ----------------------------------------------------------------------------- scenarios


def interrupt_and_resume(backend: str, sig: int) -> Callable[[Ctx, Checks], None]:
    def scenario(ctx: Ctx, c: Checks) -> None:
        over = ctx.settings("stop", run__backend=backend, pretrain__epochs=4 if backend == "ray" else 6)
        folder = ctx.ckpt_folder(over)
        run = ctx.start("pretrain", over)
        try:
            ready = run.wait_for(lambda: bool(checkpoints_in(folder)) and
                                 (backend == "local" or ray_registered(folder)))
            if not c("a checkpoint exists before the signal", ready, run.err()[-200:]):
                return
            if sig == signal.SIGKILL:
                kill_tree(run.proc)
                rc = run.finish(60)
            else:
                run.proc.send_signal(sig)
                rc = run.finish(180)
                c("exit 130", rc == 130, f"exit {rc}")
                one_line(c, run.err(), "interrupted")
        finally:
            run.close()
        key = f"stop-pretrain"
        run_id = the_run(c, ctx, key, "RUNNING" if sig == signal.SIGKILL else "KILLED")
        rerun_resumes(c, ctx, over, run_id)
    return scenario


def interrupt_before_any_checkpoint(ctx: Ctx, c: Checks) -> None:
    over = ctx.settings("early")
    run = ctx.start("pretrain", over)
    try:
        c("the MLflow run opened", run.wait_for(lambda: bool(ctx.runs("early-pretrain"))), run.err()[-200:])
        run.proc.send_signal(signal.SIGINT)
        rc = run.finish(120)
    finally:
        run.close()
    c("exit 130", rc == 130, f"exit {rc}")
    rerun_resumes(c, ctx, over, the_run(c, ctx, "early-pretrain", "KILLED"), word="[pretrain] done")


def damaged_newest_checkpoint(backend: str, every: bool = False) -> Callable[[Ctx, Checks], None]:
    def scenario(ctx: Ctx, c: Checks) -> None:
        over = ctx.settings("damaged", run__backend=backend, pretrain__epochs=2)
        first = ctx.run("pretrain", over)
        c("first run exits 0", first.rc == 0, first.err[-200:])
        ckpts = checkpoints_in(ctx.ckpt_folder(over))
        if not c("two checkpoints kept", len(ckpts) >= 2, [p.name for p in ckpts]):
            return
        for folder in (ckpts if every else ckpts[-1:]):
            for f in folder.glob("*.pt"):
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated, as by a full disk
        again = ctx.run("pretrain", {**over, "pretrain.epochs": 3})
        c("re-run with 3 epochs exits 0", again.rc == 0, again.err[-200:])
        c("a warning names the damaged checkpoint", "[warning]" in again.out and "checkpoint" in again.out,
          again.out[-300:])
        if every:
            c("a line says training starts over", "starts over" in again.out, again.out[-300:])
        else:
            c("resumes after epoch 1 (the older one, never forward)", "resuming after epoch 1" in again.out,
              again.out[-300:])
        # epochs 2 -> 3 is another config under the same run.name: its own MLflow run (params cannot change)
        runs = ctx.runs("damaged-pretrain")
        c("two MLflow runs for damaged-pretrain (one per config), both FINISHED",
          len(runs) == 2 and all(r[1] == "FINISHED" for r in runs), [(r[0][:8], r[1]) for r in runs])
    return scenario


def damaged_stage_file(name: str) -> Callable[[Ctx, Checks], None]:
    def scenario(ctx: Ctx, c: Checks) -> None:
        over = ctx.settings("redo", pretrain__epochs=1)
        first = ctx.run("pretrain", over)
        c("first run exits 0", first.rc == 0, first.err[-200:])
        run_id = the_run(c, ctx, "redo-pretrain", "FINISHED")
        path = ctx.root / "runs" / "stages" / "redo-pretrain" / name
        if not c(f"{name} exists", path.is_file(), path):
            return
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        again = ctx.run("pretrain", over)
        c("re-run exits 0", again.rc == 0, again.err[-200:])
        c("a warning says the stage runs again", "[warning]" in again.out and "already finished" not in again.out,
          again.out[-300:])
        c("the stage is done again", "[pretrain] done in" in again.out, again.out[-200:])
        rid = the_run(c, ctx, "redo-pretrain", "FINISHED", run_id)
        if rid:
            c("each epoch's loss logged once", ctx.steps(rid, "loss") == [1], ctx.steps(rid, "loss"))
        from toolkit.engine import checkpoints

        try:
            checkpoints.load(path.parent / "model.pt")
            c("model.pt readable again", True)
        except Exception as e:  # noqa: BLE001
            c("model.pt readable again", False, e)
    return scenario


def two_at_once(ctx: Ctx, c: Checks) -> None:
    over = ctx.settings("twice", pretrain__epochs=20)
    first = ctx.start("pretrain", over)
    try:
        ok = first.wait_for(lambda: bool(checkpoints_in(ctx.ckpt_folder(over))))
        c("the first run has a checkpoint", ok, first.err()[-200:])
        second = ctx.run("pretrain", over, timeout=180)
        rc = first.finish(600)
    finally:
        first.close()
    c("the second exits 2", second.rc == 2, f"exit {second.rc}")
    one_line(c, second.err, "another process")
    c("the first exits 0", rc == 0, f"exit {rc}")
    rid = the_run(c, ctx, "twice-pretrain", "FINISHED")
    if rid:
        c("each epoch logged once (1..20)", ctx.steps(rid, "loss") == list(range(1, 21)), ctx.steps(rid, "loss"))


def in_private_mounts(ctx: Ctx, script: str, timeout: float = 600) -> Proc:
    """Run a bash script in a private mount namespace (its mounts vanish with it; needs root)."""
    path = ctx.root / "script.sh"
    path.write_text("set -u\n" + script)
    return run_cli(["unshare", "--mount", "--propagation", "private", "bash", str(path)], ctx.root, timeout)


def full_disk(ctx: Ctx, c: Checks) -> None:
    """run.output_dir on a tmpfs; once the first checkpoint is there, a filler file takes every free byte."""
    mnt = ctx.root / "disk"
    mnt.mkdir()
    over = ctx.settings("full", pretrain__epochs=6, run__output_dir=str(mnt / "runs"))
    cmd = " ".join(f"'{a}'" for a in ctx.argv("pretrain", over))
    ckpts = mnt / "runs" / "local" / "full-pretrain"
    script = (f"mount -t tmpfs -o size=64m tmpfs {mnt}\n"
              f"{cmd} > first.out 2> first.err & pid=$!\n"
              f"until ls -d {ckpts}/checkpoint_* >/dev/null 2>&1 || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done\n"
              f"dd if=/dev/zero of={mnt}/filler bs=64k 2>/dev/null\n"
              "wait $pid; echo $? > first.rc\n"
              f"rm -f {mnt}/filler\n"
              f"{cmd} > second.out 2> second.err; echo $? > second.rc\n")
    done = in_private_mounts(ctx, script)
    c("the script ran", done.rc == 0, done.err[-200:])
    read = {n: (ctx.root / n).read_text() if (ctx.root / n).is_file() else "" for n in
            ("first.rc", "first.err", "second.rc", "second.out")}
    c("exit 2 on the full disk", read["first.rc"].strip() == "2", read["first.rc"])
    one_line(c, read["first.err"], "no space left")
    c("the line names the folder", str(mnt) in read["first.err"], read["first.err"][-200:])
    c("re-run with space exits 0", read["second.rc"].strip() == "0", read["second.rc"])
    c("re-run resumes", "resuming after epoch" in read["second.out"], read["second.out"][-200:])
    rid = the_run(c, ctx, "full-pretrain", "FINISHED")
    if rid:
        c("each epoch logged once (1..6)", ctx.steps(rid, "loss") == list(range(1, 7)), ctx.steps(rid, "loss"))


def read_only_output(ctx: Ctx, c: Checks) -> None:
    ro = ctx.root / "ro"
    ro.mkdir()
    over = ctx.settings("ro", run__output_dir=str(ro / "runs"))
    cmd = " ".join(f"'{a}'" for a in ctx.argv("pretrain", over))
    done = in_private_mounts(ctx, f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}\n{cmd}\n", 300)
    c("exit 2", done.rc == 2, f"exit {done.rc}")
    one_line(c, done.err, "read-only")
    c("the line names the folder", str(ro) in done.err, done.err[-200:])
    c("no MLflow run left RUNNING", not [r for r in ctx.runs() if r[1] == "RUNNING"], ctx.runs())


def lost_worker(max_failures: int) -> Callable[[Ctx, Checks], None]:
    def scenario(ctx: Ctx, c: Checks) -> None:
        over = ctx.settings("lost", run__backend="ray", ray__max_failures=max_failures)
        run = ctx.start("pretrain", over)
        try:
            ok = run.wait_for(lambda: "[pretrain] epoch 1/" in run.out() and ray_registered(ctx.ckpt_folder(over)))
            workers = ray_workers(run.proc) if ok else []
            if not c("a Ray Train worker is running after epoch 1", workers, run.err()[-200:]):
                return
            workers[-1].kill()
            rc = run.finish(400)
        finally:
            run.close()
        if max_failures:
            c("exit 0 (the worker group restarted)", rc == 0, f"exit {rc}: {run.err()[-200:]}")
            rid = the_run(c, ctx, "lost-pretrain", "FINISHED")
            if rid:
                c("each epoch logged once (1..4)", ctx.steps(rid, "loss") == [1, 2, 3, 4], ctx.steps(rid, "loss"))
            return
        c("exit 2", rc == 2, f"exit {rc}")
        one_line(c, run.err(), "worker")
        rerun_resumes(c, ctx, over, the_run(c, ctx, "lost-pretrain", "FAILED"))
    return scenario


def classifier_signal(ctx: Ctx, c: Checks) -> None:
    over = ctx.settings("cls", classifier__steps=600)
    run = ctx.start("supervised", over)
    try:
        ok = run.wait_for(lambda: bool(checkpoints_in(ctx.ckpt_folder(over, "supervised"))))
        c("a classifier checkpoint before the signal", ok, run.err()[-200:])
        run.proc.send_signal(signal.SIGINT)
        rc = run.finish(120)
    finally:
        run.close()
    c("exit 130", rc == 130, f"exit {rc}")
    run_id = the_run(c, ctx, "cls-supervised", "KILLED")
    rerun_resumes(c, ctx, over, run_id, "resuming at step", "supervised", "train_loss")


def sigterm_mixed_pipeline(ctx: Ctx, c: Checks) -> None:
    """The cpu profile's shape: pretraining on Ray Train, then the classifier in-process; SIGTERM in the latter."""
    over = ctx.settings("mixed", run__backend="ray", run__classifiers_local="true", pretrain__epochs=1,
                        classifier__steps=600, pipeline__stages="[pretrain,supervised]")
    run = ctx.start("pipeline", over)
    try:
        ok = run.wait_for(lambda: "[supervised] step 10/600" in run.out(), 400)
        c("the classifier reported once", ok, run.err()[-200:])
        run.proc.send_signal(signal.SIGTERM)
        rc = run.finish(120)
    finally:
        run.close()
    c("exit 130", rc == 130, f"exit {rc}")
    statuses = {r[1] for r in ctx.runs()}
    c("runs KILLED, none FAILED or RUNNING", "KILLED" in statuses and not {"FAILED", "RUNNING"} & statuses, statuses)
    again = ctx.run("pipeline", over)
    c("re-run exits 0", again.rc == 0, again.err[-200:])
    c("re-run resumes the classifier", "[supervised] resuming at step" in again.out, again.out[-300:])
    c("no run left RUNNING or FAILED", not {"FAILED", "RUNNING"} & {r[1] for r in ctx.runs()}, ctx.runs())


def tune_interrupt(ctx: Ctx, c: Checks) -> None:
    (ctx.root / "space.yaml").write_text(TUNE_SPACE)
    over = ctx.settings("search", run__backend="ray", data__train_subset=3000, data__test_subset=500,
                        classifier__steps=30, classifier__eval_every=30, classifier__warmup_steps=5,
                        pseudolabel__rounds=3, pseudolabel__steps_per_round=20, tune__num_samples=4,
                        trials__max_concurrent=2, trials__max_failures=0, tune__pool_subset=1500,
                        tune__space=str(ctx.root / "space.yaml"))
    run = ctx.start("tune", over)
    try:
        ok = run.wait_for(lambda: any(s == "RUNNING" for _, s in ctx.trial_runs()), 400)
        running = [r for r, s in ctx.trial_runs() if s == "RUNNING"]
        c("a trial's MLflow run is RUNNING", ok, run.err()[-200:])
        run.proc.send_signal(signal.SIGINT)
        rc = run.finish(180)
    finally:
        run.close()
    c("exit 130", rc == 130, f"exit {rc}: {run.err()[-200:]}")
    after = dict(ctx.trial_runs())
    c("every trial run that was running is KILLED", running and all(after.get(r) == "KILLED" for r in running),
      {r[:8]: after.get(r) for r in running})
    c("no run left RUNNING", not [r for r in ctx.runs() if r[1] == "RUNNING"], [(r[0][:8], r[1]) for r in ctx.runs()])
    again = ctx.run("tune", over)
    c("re-run exits 0", again.rc == 0, again.err[-200:])
    c("re-run resumes the search", "[tune] resuming the search" in again.out, again.out[-300:])
    c("no run left RUNNING after", not [r for r in ctx.runs() if r[1] == "RUNNING"], ctx.runs())


@dataclass
class Fault:
    name: str
    body: Callable[[Ctx, Checks], None]
    timeout: float = 900.0  # the whole scenario; each command has its own timeout too


FAULTS: list[Fault] = [
    Fault("sigint-pretrain-local", interrupt_and_resume("local", signal.SIGINT)),
    Fault("sigterm-pretrain-local", interrupt_and_resume("local", signal.SIGTERM)),
    Fault("sigint-pretrain-ray", interrupt_and_resume("ray", signal.SIGINT)),
    Fault("sigterm-pretrain-ray", interrupt_and_resume("ray", signal.SIGTERM)),
    Fault("sigkill-pretrain-local", interrupt_and_resume("local", signal.SIGKILL)),
    Fault("sigkill-pretrain-ray", interrupt_and_resume("ray", signal.SIGKILL)),
    Fault("sigint-before-first-checkpoint", interrupt_before_any_checkpoint),
    Fault("damaged-newest-checkpoint-local", damaged_newest_checkpoint("local")),
    Fault("damaged-newest-checkpoint-ray", damaged_newest_checkpoint("ray")),
    Fault("all-checkpoints-damaged-local", damaged_newest_checkpoint("local", every=True)),
    Fault("damaged-result-json", damaged_stage_file("result.json")),
    Fault("damaged-model-pt", damaged_stage_file("model.pt")),
    Fault("two-identical-commands", two_at_once),
    Fault("full-disk", full_disk),
    Fault("read-only-output-dir", read_only_output),
    Fault("ray-worker-killed-restarts", lost_worker(3)),
    Fault("ray-worker-killed-no-retries", lost_worker(0)),
    Fault("sigint-supervised-local", classifier_signal),
    Fault("sigterm-pipeline-classifier-after-ray", sigterm_mixed_pipeline),
    Fault("sigint-tune", tune_interrupt),
]


def run_fault(fault: Fault, root: Path, pristine: Path) -> Outcome:
    """Run one scenario in its own folder; an exception in the script itself is a failed expectation."""
    ctx = Ctx(root / "faults" / fault.name, pristine)
    ctx.root.mkdir(parents=True)
    c = Checks()
    t0 = time.perf_counter()
    try:
        fault.body(ctx, c)
    except Exception as e:  # noqa: BLE001 - reported in the table, the next scenario still runs
        c("the scenario ran to its end", False, f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    if seconds > fault.timeout:
        c(f"done within {fault.timeout:.0f} s", False, f"{seconds:.0f} s")
    return Outcome(fault.name, "fault", c.expected(), c.observed(), all(ok for _, ok, _ in c.items), seconds)
