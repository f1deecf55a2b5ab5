"""One writer per run: ``toolkit.locks.run_lock`` refuses a second process at once, in one line, and never goes stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from toolkit.config import ConfigError
from toolkit.locks import LOCK_FILE, RunLockedError, run_lock

HOLDER = textwrap.dedent("""
    import sys
    from toolkit.locks import run_lock
    with run_lock(sys.argv[1], "run 'x'"):
        print("locked", flush=True)
        sys.stdin.read()  # hold until the parent closes stdin (or kills us)
    print("released", flush=True)
""")


def _holder(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_process_is_refused_with_one_line_naming_the_holder(tmp_path):
    folder = tmp_path / "stages" / "exp-pretrain"
    holder = _holder(folder)
    try:
        with pytest.raises(RunLockedError) as err:
            with run_lock(folder, "run 'exp-pretrain'"):
                pytest.fail("the lock was taken twice")
        msg = str(err.value)
        assert "\n" not in msg
        assert f"pid {holder.pid}" in msg
        assert msg.startswith("run 'exp-pretrain' is being written by another process")
        assert "choose another run.name" in msg
        assert isinstance(err.value, ConfigError)  # the CLI's one line and exit 2
    finally:
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "released"
        holder.wait(10)
    with run_lock(folder, "run 'exp-pretrain'") as path:  # free again once the first writer is done
        assert path == folder.resolve() / LOCK_FILE
        assert path.read_text().strip() == str(os.getpid())


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    with run_lock(tmp_path, "run 'x'"):
        pass


def test_two_processes_racing_for_a_fresh_folder_one_wins(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from toolkit.locks import run_lock, RunLockedError
        start = float(sys.argv[2])
        while time.time() < start:
            time.sleep(0.001)
        try:
            with run_lock(sys.argv[1], "run 'race'"):
                time.sleep(1.5)
            print("won")
        except RunLockedError as e:
            print("refused", e)
    """)
    import time

    start = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "race"), start], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=30)[0].strip() for p in procs)
    assert outs[0].startswith("refused run 'race' is being written by another process (pid "), outs
    assert outs[1] == "won", outs


def test_the_same_process_may_reenter(tmp_path):
    with run_lock(tmp_path, "pipeline"):
        with run_lock(tmp_path, "stage"):
            pass
        # still held after the inner block: another process is refused
        p = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], input="", capture_output=True, text=True,
                           timeout=30)
        assert p.returncode != 0 and "RunLockedError" in p.stderr and f"pid {os.getpid()}" in p.stderr
    with run_lock(tmp_path, "again"):
        pass


def test_threads_of_one_process_share_the_lock(tmp_path):
    errors = []

    def worker():
        try:
            with run_lock(tmp_path, "thread"):
                pass
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    with run_lock(tmp_path, "main"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert not errors


def test_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with run_lock(tmp_path, "run"):
            raise KeyboardInterrupt
    p = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], input="", capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
