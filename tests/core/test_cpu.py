"""``spmamba.cpu``: foreground markers (held by detections, polled by a training), stale markers, lower_priority;
and ``fit`` / ``train_detector`` pausing while ``paused`` says so."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from core_helpers import small_volumes as _volumes

from spmamba import cpu
from spmamba.train import TrainingBudget, build_or_resume, fit, prepare_volumes, train_detector

LIB = str(Path(cpu.__file__).resolve().parents[1])


def _markers(folder):
    return sorted(p.name for p in Path(folder).glob("*.json")) if Path(folder).exists() else []


def test_usable_cores_is_the_affinity_at_most():
    n = cpu.usable_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_foreground_marker_lives_while_held_and_holders_do_not_remove_each_other(tmp_path):
    folder = tmp_path / "fg"
    assert not cpu.foreground_busy(folder)  # no folder yet: nobody holds one
    with cpu.foreground(folder) as first:
        rec = json.loads(first.read_text())
        assert rec["pid"] == os.getpid() and rec["what"] == "detection"
        assert cpu.foreground_busy(folder)
        with cpu.foreground(folder) as second:  # a second detection of the same process (the server's threads)
            assert first != second and len(_markers(folder)) == 2
        assert _markers(folder) == [first.name] and cpu.foreground_busy(folder)
    assert _markers(folder) == [] and not cpu.foreground_busy(folder)


def test_marker_removed_on_exception(tmp_path):
    try:
        with cpu.foreground(tmp_path):
            raise RuntimeError("detection failed")
    except RuntimeError:
        pass
    assert _markers(tmp_path) == []


def test_stale_markers_are_ignored_and_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid is free
    (tmp_path / f"{dead.pid}-dead.json").write_text(json.dumps({"pid": dead.pid, "start": time.time()}))
    # a live pid (ours) but a marker older than max_age_s (a hung detection)
    (tmp_path / "old.json").write_text(json.dumps({"pid": os.getpid(), "start": time.time() - 3600}))
    # a live pid whose process started after the marker was written (the pid was reused)
    (tmp_path / "reused.json").write_text(json.dumps({"pid": os.getpid(), "pid_start": "1", "start": time.time()}))
    (tmp_path / "garbage.json").write_text("{not json")
    assert not cpu.foreground_busy(tmp_path, max_age_s=600)
    assert _markers(tmp_path) == []


def test_marker_of_another_process_pauses_until_it_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from spmamba.cpu import foreground
            with foreground({str(tmp_path)!r}):
                print("held", flush=True)
                time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": LIB})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cpu.foreground_busy(tmp_path)
        holder.kill()  # killed: its marker stays behind, but is stale
        holder.wait()
        assert len(_markers(tmp_path)) == 1
        assert not cpu.foreground_busy(tmp_path) and _markers(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()


def test_lower_priority_once_and_numba_follows_torch_threads():
    code = textwrap.dedent("""
        import os, torch
        from spmamba import cpu
        from spmamba.ops import selective_scan, selective_scan_numba as sn
        before = os.nice(0)
        cpu.lower_priority(threads=1)
        cpu.lower_priority(threads=1)  # applied once per process
        after = os.nice(0)
        b, d, L, n = 1, 4, 16, 4
        u, dt = torch.randn(b, d, L), torch.rand(b, d, L)
        A, B, C = -torch.rand(d, n), torch.randn(b, 1, n, L), torch.randn(b, 1, n, L)
        selective_scan(u, dt, A, B, C)
        print(after - before, torch.get_num_threads(),
              sn.numba.get_num_threads() if sn.available() else 1)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": LIB, "OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(min(10, 19 - os.nice(0))), "1", "1"]


def _data(n=4):
    det, _ = build_or_resume("spmamba", "tiny", device="cpu")
    return det, det.model.training_data(prepare_volumes(_volumes(n, shape=(24, 28, 3)), det.preprocessing))


def _paused_for(polls):
    """``paused`` that says True for its first ``polls`` calls, then False."""
    asked = []

    def paused():
        asked.append(1)
        return len(asked) <= polls
    return paused, asked


def test_fit_waits_while_paused_then_finishes():
    det, data = _data()
    paused, asked = _paused_for(4)
    events = []
    budget = TrainingBudget(progress=events.append, paused=paused, pause_poll_s=0.01)
    state = fit(det, data, budget, total_epochs=1, max_steps=2, prepare=False)
    assert state.step_total == 2 and state.stop_reason == "max_steps"
    pauses = [e for e in events if e["phase"] == "paused"]
    assert len(pauses) == 1 and budget.pauses == 1 and budget.paused_seconds > 0
    assert pauses[0]["reason"] == "a detection is running"
    # the pause came before any step: the first train step event follows it
    first_step = next(i for i, e in enumerate(events) if e["phase"] == "train" and e.get("loss") is not None)
    assert events.index(pauses[0]) < first_step
    assert len(asked) > 4  # polled again after the pause (before the following steps)


def test_a_stop_request_ends_a_pause():
    det, data = _data()
    polls = []
    budget = TrainingBudget(paused=lambda: polls.append(1) or True, should_stop=lambda: len(polls) >= 3,
                            pause_poll_s=0.01)
    state = fit(det, data, budget, total_epochs=3, prepare=False)
    assert state.stop_reason == "stopped" and state.step_total == 0 and budget.pauses == 1


def test_the_deadline_ends_a_pause():
    det, data = _data()
    budget = TrainingBudget(paused=lambda: True, deadline=time.time() + 0.3, pause_poll_s=0.01)
    state = fit(det, data, budget, total_epochs=5, prepare=False)
    # the pause ends at the deadline; the one step always done, then the time limit
    assert state.stop_reason == "time_limit" and state.step_total == 1 and budget.pauses >= 1


def test_train_detector_pauses_for_a_foreground_marker_not_for_a_stale_one(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{dead.pid}-x.json").write_text(json.dumps({"pid": dead.pid, "start": time.time()}))
    events = []
    det = train_detector(_volumes(3, shape=(24, 28, 3)), config="tiny", epochs=2, device="cpu", max_steps=2,
                         paused=lambda: cpu.foreground_busy(tmp_path), progress=events.append)
    assert not [e for e in events if e["phase"] == "paused"] and det.meta["training"]["pauses"] == 0
    assert _markers(tmp_path) == []  # cleaned on the way

    held = cpu.foreground(tmp_path)
    held.__enter__()
    events.clear()

    def progress(e):
        events.append(e)
        if e["phase"] == "paused":
            held.__exit__(None, None, None)  # the detection ends

    det = train_detector(_volumes(3, shape=(24, 28, 3)), config="tiny", epochs=2, device="cpu", max_steps=2,
                         paused=lambda: cpu.foreground_busy(tmp_path), progress=progress)
    assert len([e for e in events if e["phase"] == "paused"]) == 1
    assert det.meta["training"]["pauses"] == 1 and det.meta["training"]["steps"] == 2
    assert det.calibration is not None
