"""Crash survival: kill -9 at chosen points, Ctrl-C, a full disk, damaged files.

A ``stackcat fit`` subprocess (the real CLI) is killed while a fold trains,
while a result file is being written (a temporary file is on disk, not yet
renamed), and while the meta-learner fits. Each time the run is resumed with
``--resume`` and must give exactly the out-of-fold matrices and the
predictions of an uninterrupted run, without ever reading a temporary file.
The kill points are drawn with a seeded RNG and reached by polling events the
child reports (no fixed sleeps), so timing cannot make these tests flaky.

The base model is the toy naive Bayes of ``toy_models``, registered as CLI
model ``toy``: exact equality needs a model that is bit-repeatable within a
long-lived process, and fastText is not (see docs/reliability.md).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from stackcat import runs
from stackcat.cli import EXIT_OK, EXIT_RUN_ERROR, main
from stackcat.runs import LOCK, MANIFEST, RunFolder
from stackcat.stacking import STACKER_FILE, StackingCategorizer

from toy_models import NaiveBayesText, toy_table, write_toy_csv

TESTS_DIR = Path(__file__).parent
N_FOLDS = 5
FIT_OPTIONS = ["--text-columns", "text", "--target", "label", "--id-column", "id",
               "--models", "toy", "--folds", str(N_FOLDS), "--meta", "average", "--no-progress"]
HOOK_SLEEP = 60.0  # a hooked step waits this long: the test kills the child long before
POLL_TIMEOUT = 60.0

# The child runs the real CLI after wrapping three steps so that the parent can see
# (and stop) it at a chosen point: each hooked step leaves an event file, then waits.
DRIVER = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path

    sys.path.insert(0, os.environ["CRASH_TESTS_DIR"])
    from toy_models import NaiveBayesText
    from stackcat import presets
    presets.register_model("toy", lambda options: NaiveBayesText())

    events = Path(os.environ["CRASH_EVENTS"])
    counts = {}

    def event(name):
        counts[name] = counts.get(name, 0) + 1
        (events / f"{name}-{counts[name]}").touch()
        return counts[name]

    def hook(name):
        """Wait at the n-th call of the hooked step, where n comes from CRASH_<NAME>_AT."""
        n = event(name)
        if n == int(os.environ.get(f"CRASH_{name.upper()}_AT", "0")):
            time.sleep(float(os.environ["CRASH_SLEEP"]))

    fit = NaiveBayesText.fit
    def hooked_fit(self, X, y):
        hook("fit")
        return fit(self, X, y)
    NaiveBayesText.fit = hooked_fit

    from stackcat.meta import AverageBlend
    meta_fit = AverageBlend.fit
    def hooked_meta_fit(self, probas, y):
        hook("meta")
        return meta_fit(self, probas, y)
    AverageBlend.fit = hooked_meta_fit

    replace = os.replace
    def hooked_replace(src, dst, *args, **kwargs):
        if os.environ.get("CRASH_WRITE_MATCH", "\\0") in str(dst):
            hook("write")  # the temporary file is complete on disk, not yet renamed
        return replace(src, dst, *args, **kwargs)
    os.replace = hooked_replace

    from stackcat.cli import main
    sys.exit(main(sys.argv[1:]))
''')


# --------------------------------------------------------------------------- fixtures and helpers


pytestmark = pytest.mark.usefixtures("toy_model_in_the_cli")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return write_toy_csv(tmp_path_factory.mktemp("crash-data") / "products.csv", n_per_class=30, n_classes=5,
                         seed=1)


@pytest.fixture(scope="module")
def reference(table, tmp_path_factory):
    """An uninterrupted fit: its OOF matrices and its predictions CSV."""
    run_dir = tmp_path_factory.mktemp("crash-reference") / "run"
    assert main(["fit", str(table), "--run-dir", str(run_dir), *FIT_OPTIONS]) == EXIT_OK
    return {"oof": StackingCategorizer.load(run_dir).oof_, "predictions": predictions_of(run_dir, table)}


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("crash-driver") / "crash_driver.py"
    path.write_text(DRIVER, encoding="utf-8")
    return path


def predictions_of(run_dir: Path, table: Path) -> bytes:
    out = run_dir.parent / f"predictions-{run_dir.name}.csv"
    test = run_dir.parent / "to-predict.csv"
    pd.read_csv(table, dtype=str).drop(columns="label").to_csv(test, index=False)
    assert main(["predict", str(run_dir), str(test), "--out", str(out)]) == EXIT_OK
    return out.read_bytes()


def start_fit(driver: Path, table: Path, run_dir: Path, events: Path, **hooks: str) -> subprocess.Popen:
    events.mkdir()
    env = {**os.environ, "CRASH_EVENTS": str(events), "CRASH_SLEEP": str(HOOK_SLEEP),
           "CRASH_TESTS_DIR": str(TESTS_DIR), **hooks}
    with open(events / "stdout.txt", "w") as stdout, open(events / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, str(driver), "fit", str(table), "--run-dir", str(run_dir),
                                 *FIT_OPTIONS], env=env, stdout=stdout, stderr=stderr,
                                preexec_fn=listen_to_ctrl_c)


def listen_to_ctrl_c() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps an
    # inherited SIG_IGN: without this, a suite run as `make test &` never
    # delivers the Ctrl-C these tests send.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stderr_of(events: Path) -> str:
    return (events / "stderr.txt").read_text()


def wait_for(child: subprocess.Popen, events: Path, condition, what: str) -> None:
    deadline = time.monotonic() + POLL_TIMEOUT
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"the fit ended (exit {child.returncode}) before {what}:\n{stderr_of(events)}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill_at(child: subprocess.Popen, events: Path, name: str, n: int) -> None:
    """SIGKILL the child once it waits in the n-th call of a hooked step."""
    wait_for(child, events, lambda: (events / f"{name}-{n}").exists(), f"event {name}-{n}")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def finished_jobs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("jobs/*/*.oof.npz"))


def temp_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob(".*.tmp"))


def assert_every_final_file_loads(run_dir: Path) -> None:
    """Whatever the moment of the kill, a file under its final name is whole."""
    for path in run_dir.rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.name.endswith(".npz"):
            with np.load(path) as stored:
                assert {"test", "oof"} <= set(stored.files)
        elif path.name.endswith(".joblib"):
            joblib.load(path)
        elif path.name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def load_spy(monkeypatch):
    """Every path that np.load / joblib.load opens while resuming."""
    opened: list[str] = []
    np_load, joblib_load = np.load, joblib.load

    def spy_np_load(file, *args, **kwargs):
        opened.append(str(getattr(file, "name", file)))
        return np_load(file, *args, **kwargs)

    def spy_joblib_load(filename, *args, **kwargs):
        opened.append(str(getattr(filename, "name", filename)))  # a path or an open file
        return joblib_load(filename, *args, **kwargs)

    monkeypatch.setattr(np, "load", spy_np_load)
    monkeypatch.setattr(joblib, "load", spy_joblib_load)
    return opened


def resume_and_compare(run_dir: Path, table: Path, reference, load_spy, capsys) -> str:
    capsys.readouterr()
    assert main(["fit", str(table), "--run-dir", str(run_dir), "--resume", *FIT_OPTIONS]) == EXIT_OK
    output = capsys.readouterr().out
    assert not [p for p in load_spy if p.endswith(".tmp")], "a temporary file was read"
    assert temp_files(run_dir) == [], "temporary files left behind by the killed writer"
    resumed = StackingCategorizer.load(run_dir)
    assert set(resumed.oof_) == set(reference["oof"])
    for name, matrix in reference["oof"].items():
        np.testing.assert_array_equal(resumed.oof_[name], matrix)
    assert predictions_of(run_dir, table) == reference["predictions"]
    assert json.loads((run_dir / MANIFEST).read_text())["status"] == "complete"
    return output


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_during_a_fold_then_resume(seed, driver, table, reference, tmp_path, load_spy, capsys):
    fold = random.Random(seed).randint(1, N_FOLDS)  # the fit of this fold never finishes
    run_dir, events = tmp_path / "run", tmp_path / "events"
    child = start_fit(driver, table, run_dir, events, CRASH_FIT_AT=str(fold))
    kill_at(child, events, "fit", fold)
    assert len(finished_jobs(run_dir)) == fold - 1
    assert_every_final_file_loads(run_dir)
    output = resume_and_compare(run_dir, table, reference, load_spy, capsys)
    assert f"{fold - 1} of {N_FOLDS} jobs already done" in output or fold == 1


@pytest.mark.slow
@pytest.mark.parametrize(("match", "seed"), [("/jobs/", 2), ("/meta/", 0), (f"/{STACKER_FILE}", 0)])
def test_kill_while_a_result_file_is_written(match, seed, driver, table, reference, tmp_path,
                                             load_spy, capsys):
    """Killed between writing a temporary file and renaming it: the half-done write is never read."""
    writes = {"/jobs/": 2 * N_FOLDS, "/meta/": 1}.get(match, 1)  # a job writes 2 files
    n = random.Random(seed).randint(1, writes)
    run_dir, events = tmp_path / "run", tmp_path / "events"
    child = start_fit(driver, table, run_dir, events, CRASH_WRITE_MATCH=match, CRASH_WRITE_AT=str(n))
    kill_at(child, events, "write", n)
    assert temp_files(run_dir), "the kill should leave the temporary file of the interrupted write"
    if match == "/jobs/":
        assert len(finished_jobs(run_dir)) == (n - 1) // 2
    assert_every_final_file_loads(run_dir)
    resume_and_compare(run_dir, table, reference, load_spy, capsys)


@pytest.mark.slow
def test_kill_during_the_meta_learner_reuses_every_job(driver, table, reference, tmp_path, load_spy, capsys):
    run_dir, events = tmp_path / "run", tmp_path / "events"
    calls = random.Random(3).randint(1, N_FOLDS + 1)  # the meta-learner is fitted once per fold, then on all rows
    child = start_fit(driver, table, run_dir, events, CRASH_META_AT=str(calls))
    kill_at(child, events, "meta", calls)
    assert len(finished_jobs(run_dir)) == N_FOLDS
    assert not (run_dir / STACKER_FILE).exists()
    output = resume_and_compare(run_dir, table, reference, load_spy, capsys)
    assert f"{N_FOLDS} of {N_FOLDS} jobs already done" in output


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_sigint_stops_cleanly_with_the_resume_hint(driver, table, reference, tmp_path, load_spy, capsys):
    run_dir, events = tmp_path / "run", tmp_path / "events"
    child = start_fit(driver, table, run_dir, events, CRASH_FIT_AT="3")
    wait_for(child, events, lambda: (events / "fit-3").exists(), "the third fold")
    child.send_signal(signal.SIGINT)
    child.wait(timeout=30)
    stderr = stderr_of(events)
    assert child.returncode == EXIT_RUN_ERROR
    assert "stopped by Ctrl-C" in stderr and "--resume" in stderr and str(run_dir) in stderr
    assert "Traceback" not in stderr
    assert len(finished_jobs(run_dir)) == 2
    resume_and_compare(run_dir, table, reference, load_spy, capsys)


def test_ctrl_c_in_process_releases_the_lock_and_keeps_finished_jobs(table, tmp_path, monkeypatch, capsys):
    fit, calls = NaiveBayesText.fit, []

    def interrupted_on_third_fit(self, X, y):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fit(self, X, y)

    monkeypatch.setattr(NaiveBayesText, "fit", interrupted_on_third_fit)
    run_dir = tmp_path / "run"
    assert main(["fit", str(table), "--run-dir", str(run_dir), *FIT_OPTIONS]) == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert f"stopped by Ctrl-C; finished jobs are saved in {run_dir}" in err and "--resume" in err
    assert len(finished_jobs(run_dir)) == 2
    with open(run_dir / LOCK) as handle:  # a lock still held by this process would refuse this
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- a full disk


def stack_of(run_dir: Path, alpha: float) -> StackingCategorizer:
    return StackingCategorizer([("a", NaiveBayesText()), ("b", NaiveBayesText(alpha=alpha))], meta="average",
                               n_splits=3, random_state=0, run_dir=run_dir, progress=False, verbose=0)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and p.name not in (MANIFEST, LOCK)}


def fail_once(target, name: str, calls_before_failure: int, monkeypatch, when=lambda *a, **k: True):
    """Make ``target.name`` raise ENOSPC on its n-th matching call (0-based), once."""
    original, seen = getattr(target, name), []

    def flaky(*args, **kwargs):
        if when(*args, **kwargs):
            seen.append(1)
            if len(seen) == calls_before_failure + 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, flaky)
    return seen


def fsync_of_manifest(fd: int) -> bool:
    return Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{MANIFEST}.")


@pytest.mark.parametrize(("target", "name", "nth", "when"), [
    (runs.np, "savez", 1, None),          # an OOF file of the changed model
    (runs.joblib, "dump", 0, None),       # the first fold model of the changed model
    (runs.os, "fsync", 0, fsync_of_manifest),  # the manifest itself
])
def test_full_disk_keeps_earlier_results_and_a_rerun_completes(target, name, nth, when, tmp_path, monkeypatch):
    X, y = toy_table()
    run_dir = tmp_path / "run"
    first = stack_of(run_dir, alpha=1.0).fit(X, y)
    before, manifest_before = snapshot(run_dir), (run_dir / MANIFEST).read_bytes()
    fail_once(target, name, nth, monkeypatch, **({"when": when} if when else {}))
    with pytest.raises(OSError, match="No space left on device"):
        stack_of(run_dir, alpha=2.0).fit(X, y)  # model "b" changed: its jobs are recomputed
    monkeypatch.undo()
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing earlier touched
    assert temp_files(run_dir) == []
    manifest = json.loads((run_dir / MANIFEST).read_text())
    if name == "fsync":
        assert (run_dir / MANIFEST).read_bytes() == manifest_before
    else:
        assert manifest["status"] == "running"
    np.testing.assert_array_equal(StackingCategorizer.load(run_dir).predict_proba(X), first.predict_proba(X))
    rerun = stack_of(run_dir, alpha=2.0).fit(X, y)
    clean = stack_of(None, alpha=2.0).fit(X, y)
    for model in ("a", "b"):
        np.testing.assert_array_equal(rerun.oof_[model], clean.oof_[model])
    assert rerun.jobs_.query("model == 'a'")["from_run_folder"].all()


def test_full_disk_through_the_cli_says_how_to_continue(table, tmp_path, monkeypatch, capsys):
    fail_once(runs.np, "savez", 2, monkeypatch)
    run_dir = tmp_path / "run"
    assert main(["fit", str(table), "--run-dir", str(run_dir), *FIT_OPTIONS]) == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert len(finished_jobs(run_dir)) == 2
    monkeypatch.undo()
    assert main(["fit", str(table), "--run-dir", str(run_dir), "--resume", *FIT_OPTIONS]) == EXIT_OK


# --------------------------------------------------------------------------- damaged files


def test_damaged_or_missing_job_files_are_recomputed_not_read(tmp_path):
    X, y = toy_table()
    run_dir = tmp_path / "run"
    clean = stack_of(run_dir, alpha=1.0).fit(X, y)
    oof_files = sorted(run_dir.glob("jobs/a/*.oof.npz"))
    oof_files[0].write_bytes(oof_files[0].read_bytes()[:100])  # disk damage, not a stackcat write
    next(run_dir.glob("jobs/b/*.model.joblib")).unlink()
    (run_dir / "jobs" / "a" / ".fold-9.abc.oof.npz.x1y2.tmp").write_bytes(b"left by a killed writer")
    with pytest.warns(UserWarning) as caught:
        again = stack_of(run_dir, alpha=1.0).fit(X, y)
    messages = " ".join(str(w.message) for w in caught)
    assert "unreadable" in messages and "fitted model file is gone" in messages
    assert (~again.jobs_["from_run_folder"]).sum() == 2  # exactly the two damaged jobs
    for model in ("a", "b"):
        np.testing.assert_array_equal(again.oof_[model], clean.oof_[model])
    assert temp_files(run_dir) == []


def test_a_damaged_stacker_file_is_named_with_the_way_out(tmp_path, table, capsys):
    run_dir = tmp_path / "run"
    assert main(["fit", str(table), "--run-dir", str(run_dir), *FIT_OPTIONS]) == EXIT_OK
    stacker = run_dir / STACKER_FILE
    stacker.write_bytes(stacker.read_bytes()[: stacker.stat().st_size // 2])
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(table), "--out", str(tmp_path / "p.csv")]) == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert f"{stacker}: refused" in err and "does not match its content" in err and "--resume" in err
    assert not (tmp_path / "p.csv").exists()
    assert main(["fit", str(table), "--run-dir", str(run_dir), "--resume", *FIT_OPTIONS]) == EXIT_OK
    assert main(["predict", str(run_dir), str(table), "--out", str(tmp_path / "p.csv")]) == EXIT_OK


def test_lock_holder_is_refused_through_the_cli(table, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunFolder(run_dir).locked():
        (run_dir / MANIFEST).write_text("{}")
        code = main(["fit", str(table), "--run-dir", str(run_dir), "--resume", *FIT_OPTIONS])
    assert code == EXIT_RUN_ERROR
    assert f"in use by pid {os.getpid()}" in capsys.readouterr().err
