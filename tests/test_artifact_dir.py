"""Output folder safety (issue 19): --force replaces only artifacts, one compile per folder, no leftovers, umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import effc
import effc.runtime
from effc.artifact_dir import OutputLock, make_staging_dir, old_artifact_path, remove_stale
from effc.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]


def _compile(mlp_path, out, **kwargs):
    return effc.compile(str(mlp_path), out_dir=out, measure_latency=False, eval_samples=1, **kwargs)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_force_refuses_a_folder_that_is_not_an_artifact(tmp_path, mlp_path):
    out = tmp_path / "project"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ArtifactError, match=r"not an effc artifact \(no effc manifest.json\) and holds \.git/, "
                                            r"notes\.txt; fix: choose a new or empty -o folder"):
        _compile(mlp_path, out, force=True)
    assert (out / "notes.txt").read_text() == "my notes" and (out / ".git" / "HEAD").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "project"]  # no lock or staging left


def test_force_replaces_an_artifact_but_not_one_holding_user_files(tmp_path, mlp_path):
    out = tmp_path / "out"
    _compile(mlp_path, out)
    first = (out / "manifest.json").read_text()
    _compile(mlp_path, out, force=True, passes="prune(sparsity=0.5,min_params=0)")
    assert (out / "manifest.json").read_text() != first
    (out / "mine.csv").write_text("1,2\n")
    with pytest.raises(ArtifactError, match=r"also holds mine\.csv, which its manifest does not list"):
        _compile(mlp_path, out, force=True)
    assert (out / "mine.csv").exists()
    effc.runtime.load(out)


def test_empty_folder_needs_no_force_and_artifact_gets_the_users_umask(tmp_path, mlp_path):
    out = tmp_path / "empty"
    out.mkdir()
    old = os.umask(0o027)
    try:
        _compile(mlp_path, out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # mkdtemp's 0700 before
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o640


def test_second_compile_into_a_locked_folder_is_refused(tmp_path, mlp_path):
    """A real second process holds the lock; the compile fails at once, naming it, and writes nothing."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from effc.artifact_dir import OutputLock\n"
         f"with OutputLock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArtifactError, match=rf"another effc compile \(process {holder.pid}@\S+\) is writing to"):
            _compile(mlp_path, out)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    _compile(mlp_path, out)  # the kernel released the dead holder's lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out"]


def test_lock_is_exclusive_within_one_process_and_removed_after(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with OutputLock(out) as lock:
        assert lock.path.exists()
        with pytest.raises(ArtifactError, match="another effc compile"), OutputLock(out):
            pass
    assert not (tmp_path / "a").exists()  # the folders it created for the lock went with it


def test_leftovers_of_a_dead_compile_are_removed_and_a_moved_artifact_restored(tmp_path, mlp_path, monkeypatch):
    out = tmp_path / "out"
    _compile(mlp_path, out)
    dead = _dead_pid()
    monkeypatch.setattr(os, "getpid", lambda: dead)
    staging = make_staging_dir(out)  # what a compile killed during its build leaves
    (staging / "model.so").write_bytes(b"\0" * 1000)
    out.rename(old_artifact_path(out))  # killed between moving the old artifact aside and the new one in
    monkeypatch.undo()
    alive = make_staging_dir(out)  # this process is alive: its folder stays
    done = remove_stale(out)
    assert len(done) == 2 and not staging.exists() and alive.exists()
    effc.runtime.load(out)  # the previous artifact is back
    alive.rmdir()
    _compile(mlp_path, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_compile_leaves_nothing_the_next_compile_does_not_remove(tmp_path, mlp_path, sig):
    """Kill a real `effc compile` once its staging folder exists; the next compile cleans up and succeeds.

    SIGTERM exits through Python's cleanup, so nothing is left at all; SIGKILL leaves the staging folder.
    """
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "effc.cli", "compile", str(mlp_path), "-o", str(out), "--no-latency"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(".out.tmp-" in p.name for p in tmp_path.iterdir()):
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode in (-sig, 128 + sig), "the compile finished before its staging folder was seen"
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "mlp.onnx")
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert left == []
    else:
        assert any(".out.tmp-" in n for n in left)
    _compile(mlp_path, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out"]
