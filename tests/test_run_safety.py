"""Run folders that are never silently wrong and never run code (issue 12).

- Content-exact resume: a job's key covers the content of the files its model
  reads (images replaced under the same names are re-read, the jobs of the
  models that read them recomputed).
- Signed pickles: a crafted ``stacker.joblib`` or fold model is refused before
  it is unpickled (its code never runs); ``--trust-run-dir`` loads a folder
  signed with another key or none.
- Damaged files: named, with the way out; ``--resume`` recomputes them.
- Smaller: file permissions follow the umask; too little data for the
  meta-learner; ``--n-jobs 0``; fastText's training text in the run folder;
  thin images; log lines without a terminal.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from stackcat import files, runs
from stackcat.cli import EXIT_OK, EXIT_RUN_ERROR, EXIT_USAGE, main
from stackcat.features import images
from stackcat.models.image import ImageEmbeddingClassifier
from stackcat.runs import (
    file_columns_of,
    frame_fingerprint,
    key_path,
    load_pickle,
    signature_path,
    signature_problem,
    write_joblib,
)
from stackcat.stacking import STACKER_FILE, StackingCategorizer

from tiny_images import CountingEncoder
from toy_models import NaiveBayesText, toy_table, write_toy_csv

TESTS_DIR = Path(__file__).parent
FIT_OPTIONS = ["--text-columns", "text", "--target", "label", "--id-column", "id",
               "--models", "toy", "--folds", "3", "--meta", "average", "--no-progress"]
COLOURS = [(200, 30, 30), (30, 40, 190), (30, 170, 40)]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return write_toy_csv(tmp_path_factory.mktemp("safety-data") / "products.csv", n_per_class=12, n_classes=3,
                         seed=2)


@pytest.fixture
def fitted_run(table, tmp_path, toy_model_in_the_cli) -> Path:
    run_dir = tmp_path / "run"
    assert main(["fit", str(table), "--run-dir", str(run_dir), *FIT_OPTIONS]) == EXIT_OK
    return run_dir


def predict(run_dir: Path, table: Path, out: Path, *extra: str) -> int:
    return main(["predict", str(run_dir), str(table), "--out", str(out), *extra])


class WritesAMarker:
    """A crafted pickle: unpickling it runs ``os.system`` (it creates ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_images(folder: Path, labels: np.ndarray, colour_of_class: list) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    classes = sorted(set(labels))
    paths = []
    for row, label in enumerate(labels):
        path = folder / f"{row}.png"
        Image.new("RGB", (8, 8), colour_of_class[classes.index(label)]).save(path)
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------- content-exact resume


def image_stack(run_dir: Path, encoder) -> StackingCategorizer:
    return StackingCategorizer(
        [("text", NaiveBayesText()),
         ("image", ImageEmbeddingClassifier(encoder=encoder, C=10.0, random_state=0, progress=False))],
        meta="average", n_splits=3, random_state=0, run_dir=run_dir, progress=False, verbose=0)


def test_images_replaced_under_the_same_names_recompute_the_image_jobs_only(tmp_path, monkeypatch):
    X, y = toy_table(n_per_class=8, n_classes=3, seed=3)
    X["image_path"] = write_images(tmp_path / "imgs", y, COLOURS)
    encoder = CountingEncoder()
    first = image_stack(tmp_path / "run", encoder).fit(X, y)
    assert first.oof_scores_.loc["image", "accuracy"] == 1.0

    hashed = []
    hash_into = files._hash_into
    monkeypatch.setattr(files, "_hash_into", lambda hasher, path: hashed.append(path) or hash_into(hasher, path))
    again = image_stack(tmp_path / "run", encoder).fit(X, y)
    assert again.jobs_["from_run_folder"].all()
    assert hashed == [], "unchanged files were read again (the hash is remembered by path, size, mtime)"

    write_images(tmp_path / "imgs", y, COLOURS[1:] + COLOURS[:1])  # every class now has another colour
    replaced = image_stack(tmp_path / "run", encoder).fit(X, y)
    from_folder = replaced.jobs_.set_index(["model", "job"])["from_run_folder"]
    assert from_folder["text"].all() and not from_folder["image"].any()
    assert len(hashed) == len(X)  # each replaced file read once, for the keys and the embeddings together
    assert not np.array_equal(replaced.oof_["image"], first.oof_["image"])
    np.testing.assert_array_equal(replaced.oof_["text"], first.oof_["text"])


class WithStopWords(NaiveBayesText):
    """Reads a local file named by a param (as a text model reads its checkpoint folder)."""

    def __init__(self, text_column="text", alpha=1.0, stop_words_file=None):
        super().__init__(text_column=text_column, alpha=alpha)
        self.stop_words_file = stop_words_file

    def fit(self, X, y):
        self.stop_words_ = Path(self.stop_words_file).read_text().split()
        return super().fit(X, y)


def test_a_file_named_by_a_param_and_replaced_in_place_recomputes(tmp_path):
    X, y = toy_table(n_per_class=6, n_classes=3)
    words = tmp_path / "stop.txt"
    words.write_text("n1 n2")

    def fit():
        return StackingCategorizer([("a", WithStopWords(stop_words_file=str(words))), ("b", NaiveBayesText())],
                                   meta="average", n_splits=3, run_dir=tmp_path / "run", progress=False,
                                   verbose=0).fit(X, y)

    fit()
    assert fit().jobs_["from_run_folder"].all()
    words.write_text("n1 n2 n3")
    from_folder = fit().jobs_.set_index(["model", "job"])["from_run_folder"]
    assert not from_folder["a"].any() and from_folder["b"].all()


class ReadsDocuments(NaiveBayesText):
    file_columns = ["doc_path"]


def test_file_columns_are_found_by_declaration_or_param_name():
    assert file_columns_of(ImageEmbeddingClassifier(image_column="photo")) == ["photo"]
    assert file_columns_of(NaiveBayesText()) == []
    assert file_columns_of(ReadsDocuments()) == ["doc_path"]
    pipeline = make_pipeline(FunctionTransformer(), ImageEmbeddingClassifier())
    assert file_columns_of(pipeline) == ["image_path"]


def test_fingerprint_covers_file_content_for_paths_given_as_a_list(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4), "red").save(path)
    before = frame_fingerprint([str(path)], file_columns=["image_path"])
    assert frame_fingerprint([str(path)]) != before
    time.sleep(0.01)
    Image.new("RGB", (4, 4), "blue").save(path)
    assert frame_fingerprint([str(path)], file_columns=["image_path"]) != before


# --------------------------------------------------------------------------- signed pickles


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("keep_old_signature", [False, True])
def test_a_crafted_stacker_file_is_refused_and_its_code_never_runs(command, keep_old_signature, fitted_run,
                                                                   table, tmp_path, capsys):
    stacker = fitted_run / STACKER_FILE
    marker = tmp_path / "code-ran"
    joblib.dump(WritesAMarker(marker), stacker)
    if not keep_old_signature:
        signature_path(stacker).unlink()
    capsys.readouterr()
    out = tmp_path / "p.csv"
    args = ["--out", str(out)] if command == "predict" else []
    assert main([command, str(fitted_run), str(table), *args]) == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert not marker.exists(), "the crafted pickle was unpickled"
    assert f"{stacker}: refused to load this fitted stack" in err and "--trust-run-dir" in err
    assert ("does not match its content" if keep_old_signature else "it is not signed") in err
    assert "Traceback" not in err and not out.exists()


def test_a_crafted_fold_model_is_refused(fitted_run, table, tmp_path, capsys):
    model_file = sorted(fitted_run.glob("jobs/toy/*.model.joblib"))[1]
    marker = tmp_path / "code-ran"
    joblib.dump(WritesAMarker(marker), model_file)
    capsys.readouterr()
    assert predict(fitted_run, table, tmp_path / "p.csv") == EXIT_RUN_ERROR
    assert not marker.exists()
    assert f"{model_file}: refused to load this fold model" in capsys.readouterr().err


def test_an_unsigned_folder_loads_when_trusted(fitted_run, table, tmp_path, capsys):
    assert predict(fitted_run, table, tmp_path / "signed.csv") == EXIT_OK
    for signature in fitted_run.rglob("*.sig"):
        signature.unlink()
    capsys.readouterr()
    assert predict(fitted_run, table, tmp_path / "refused.csv") == EXIT_RUN_ERROR
    assert "it is not signed" in capsys.readouterr().err
    assert predict(fitted_run, table, tmp_path / "trusted.csv", "--trust-run-dir") == EXIT_OK
    assert (tmp_path / "trusted.csv").read_bytes() == (tmp_path / "signed.csv").read_bytes()
    assert main(["evaluate", str(fitted_run), str(table), "--trust-run-dir"]) == EXIT_OK


def test_another_users_key_is_refused(fitted_run, table, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STACKCAT_KEY_FILE", str(tmp_path / "colleague" / "key"))
    assert predict(fitted_run, table, tmp_path / "p.csv") == EXIT_RUN_ERROR
    assert "another user's key" in capsys.readouterr().err
    assert predict(fitted_run, table, tmp_path / "p.csv", "--trust-run-dir") == EXIT_OK


def test_the_key_is_made_once_and_private(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKCAT_KEY_FILE", str(tmp_path / "config" / "key"))
    assert not key_path().exists()
    first = write_joblib({"a": 1}, tmp_path / "a.joblib")
    assert stat.S_IMODE(key_path().stat().st_mode) == 0o600
    key = key_path().read_bytes()
    write_joblib({"b": 2}, tmp_path / "b.joblib")
    assert key_path().read_bytes() == key and load_pickle(first) == {"a": 1}


@pytest.mark.slow
def test_parallel_workers_write_unsigned_models_that_the_driver_signs(tmp_path):
    X, y = toy_table(n_per_class=9, n_classes=3)
    StackingCategorizer([("a", NaiveBayesText())], meta="average", n_splits=3, run_dir=tmp_path / "run",
                        n_jobs=2, backend="loky", progress=False, verbose=0).fit(X, y)
    model_files = sorted((tmp_path / "run").glob("jobs/a/*.model.joblib"))
    assert len(model_files) == 3 and all(signature_problem(path) is None for path in model_files)


# --------------------------------------------------------------------------- damaged files


def test_a_truncated_fold_model_is_named_and_resume_recomputes_it(fitted_run, table, tmp_path, capsys):
    assert predict(fitted_run, table, tmp_path / "before.csv") == EXIT_OK
    model_file = sorted(fitted_run.glob("jobs/toy/*.model.joblib"))[0]
    model_file.write_bytes(model_file.read_bytes()[:50])
    capsys.readouterr()
    assert predict(fitted_run, table, tmp_path / "p.csv") == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert str(model_file) in err and "--resume" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match="does not match its content"):
        assert main(["fit", str(table), "--run-dir", str(fitted_run), "--resume", *FIT_OPTIONS]) == EXIT_OK
    assert "2 of 3 jobs already done" in capsys.readouterr().out
    assert predict(fitted_run, table, tmp_path / "after.csv") == EXIT_OK
    assert (tmp_path / "after.csv").read_bytes() == (tmp_path / "before.csv").read_bytes()


@pytest.mark.parametrize("trusted", [False, True])
def test_a_stacker_file_holding_something_else_is_named(trusted, fitted_run, table, tmp_path, capsys):
    stacker = fitted_run / STACKER_FILE
    write_joblib([1, 2, 3], stacker, sign=not trusted)
    extra = ["--trust-run-dir"] if trusted else []
    assert predict(fitted_run, table, tmp_path / "p.csv", *extra) == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert f"{stacker}: holds a list, not a fitted StackingCategorizer" in err and "--resume" in err


def test_a_fold_model_holding_something_else_is_named(fitted_run, table, tmp_path, capsys):
    model_file = sorted(fitted_run.glob("jobs/toy/*.model.joblib"))[0]
    write_joblib({"not": "a model"}, model_file)
    assert predict(fitted_run, table, tmp_path / "p.csv") == EXIT_RUN_ERROR
    assert f"{model_file}: holds a dict, not a fitted classifier" in capsys.readouterr().err


def test_a_damaged_file_read_with_trust_is_named(fitted_run, table, tmp_path, capsys):
    model_file = sorted(fitted_run.glob("jobs/toy/*.model.joblib"))[0]
    model_file.write_bytes(model_file.read_bytes()[:50])
    assert predict(fitted_run, table, tmp_path / "p.csv", "--trust-run-dir") == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert f"{model_file}: unreadable fold model" in err and "--resume" in err


# --------------------------------------------------------------------------- smaller defects


def test_files_follow_the_umask(table, tmp_path, toy_model_in_the_cli):
    old = os.umask(0o027)
    try:
        assert main(["fit", str(table), "--run-dir", str(tmp_path / "run"), *FIT_OPTIONS]) == EXIT_OK
        assert predict(tmp_path / "run", table, tmp_path / "p.csv") == EXIT_OK
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()] + [tmp_path / "p.csv"]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o640"}, modes


def test_too_little_data_for_the_meta_learner_is_a_clear_error(tmp_path, toy_model_in_the_cli, capsys):
    path = tmp_path / "three.csv"
    pd.DataFrame({"id": [1, 2, 3], "text": ["red shirt", "blue jeans", "red shirt cotton"],
                  "label": ["a", "b", "a"]}).to_csv(path, index=False)
    options = [o if o != "average" else "auto" for o in FIT_OPTIONS]
    options[options.index("--folds") + 1] = "2"
    assert main(["fit", str(path), "--run-dir", str(tmp_path / "run"), *options]) == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert "the meta-learner (meta='auto') failed on the out-of-fold probabilities of 3 rows" in err
    assert "--meta average" in err and "Traceback" not in err


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--n-jobs", "0", "--n-jobs 0 would run no job"),
    ("--folds", "1", "--folds 1: out-of-fold stacking needs at least 2 folds"),
])
def test_impossible_numbers_are_usage_errors(option, value, message, table, tmp_path, toy_model_in_the_cli,
                                             capsys):
    options = [o for o in FIT_OPTIONS]
    if option in options:
        options[options.index(option) + 1] = value
    else:
        options += [option, value]
    assert main(["fit", str(table), "--run-dir", str(tmp_path / "run"), *options]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "--resume" not in err
    assert not (tmp_path / "run").exists()


FASTTEXT_DRIVER = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from stackcat.models import fasttext

    train = fasttext._train_halving_lr_on_nan
    def hooked(path, options):
        Path(os.environ["EVENT_FILE"]).write_text(path)
        time.sleep(60)
        return train(path, options)
    fasttext._train_halving_lr_on_nan = hooked

    from stackcat.cli import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.slow
def test_kill_during_a_fasttext_fold_leaves_nothing_in_tmpdir(table, tmp_path):
    tmpdir, run_dir, event = tmp_path / "tmpdir", tmp_path / "run", tmp_path / "training-text"
    tmpdir.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(FASTTEXT_DRIVER)
    options = [o if o != "toy" else "fasttext" for o in FIT_OPTIONS]
    options += ["--param", "fasttext__dim=8", "--param", "fasttext__n_threads=1", "--param", "fasttext__epoch=2"]
    env = {**os.environ, "TMPDIR": str(tmpdir), "EVENT_FILE": str(event)}
    child = subprocess.Popen([sys.executable, str(driver), "fit", str(table), "--run-dir", str(run_dir), *options],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not event.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the fastText fold never started"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    training_text = Path(event.read_text())
    assert training_text.parent == run_dir / "tmp" and training_text.exists()
    assert list(tmpdir.iterdir()) == []
    env.pop("EVENT_FILE")
    resumed = subprocess.run([sys.executable, "-m", "stackcat.cli", "fit", str(table), "--run-dir", str(run_dir),
                              "--resume", *options], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert not training_text.exists() and list((run_dir / "tmp").iterdir()) == []
    assert list(tmpdir.iterdir()) == []


THIN_IMAGE_PEAK = textwrap.dedent('''
    import resource, sys
    import numpy as np
    from PIL import Image
    from stackcat.features.images import image_embeddings

    class ResizingEncoder:
        """Resize the short side to 224 px and centre-crop, like the real encoders' preprocessing."""
        name = "resize-224"
        def encode(self, images):
            rows = []
            for image in images:
                scale = 224 / min(image.size)
                image = image.resize((max(224, round(image.width * scale)), max(224, round(image.height * scale))))
                left, top = (image.width - 224) // 2, (image.height - 224) // 2
                rows.append(np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32).mean((0, 1)))
            return np.array(rows)

    folder = sys.argv[1]
    Image.new("RGB", (16, 16), "red").save(f"{folder}/small.png")
    Image.new("L", (3000, 1), 128).save(f"{folder}/wide.png")
    Image.new("L", (1, 3000), 128).save(f"{folder}/tall.png")
    image_embeddings([f"{folder}/small.png"], ResizingEncoder(), progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = image_embeddings([f"{folder}/wide.png", f"{folder}/tall.png"], ResizingEncoder(), progress=False)
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(added // 1024, *result.status)
''')


def test_thin_images_cost_little_memory(tmp_path):
    # Before the crop, the 3000 x 1 image alone blew up to 672,000 x 224 px (450 MB) in the encoder.
    script = tmp_path / "peak.py"
    script.write_text(THIN_IMAGE_PEAK)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=True)
    added_mb, *statuses = done.stdout.split()
    assert statuses == ["ok", "ok"]
    assert int(added_mb) < 50, f"a thin image added {added_mb} MB"


def stripes_test_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 340, 4), dtype=np.uint8)
    palette_alpha = Image.fromarray(pixels[..., :3].copy()).convert("P")
    palette_alpha.info["transparency"] = 3
    return {"RGB": Image.fromarray(pixels[..., :3].copy()), "RGBA": Image.fromarray(pixels),
            "LA": Image.fromarray(pixels).convert("LA"), "P+alpha": palette_alpha,
            "I;16": Image.fromarray(pixels[..., 0].astype(np.uint16) * 257),
            "F": Image.fromarray(pixels[..., 0].astype(np.float32) / 255),
            "1": Image.fromarray(pixels[..., 0].copy()).convert("1"), "CMYK": Image.fromarray(pixels).convert("CMYK")}


@pytest.mark.parametrize("factor", [1, 3])
def test_strip_by_strip_conversion_equals_the_whole_image_one(factor, monkeypatch):
    monkeypatch.setattr(images, "_STRIP_PIXELS", 340 * 40)  # 8 strips
    for mode, image in stripes_test_images().items():
        whole = images.to_rgb(image)
        whole = whole.reduce(factor) if factor > 1 else whole
        np.testing.assert_array_equal(np.asarray(images._reduced_rgb(image, factor)), np.asarray(whole),
                                      err_msg=mode)


def test_exif_orientation_survives_the_strip_path(tmp_path):
    pixels = np.zeros((200, 300, 3), dtype=np.uint8)
    pixels[:10] = 255  # a white band on top
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # turned 90 degrees
    image.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "turned.jpg") as loaded:
        loaded.load()
        strips = np.asarray(images._reduced_rgb(loaded, 2), dtype=int)
        whole = np.asarray(images.to_rgb(loaded).reduce(2), dtype=int)
    assert strips.shape == (150, 100, 3) and np.abs(strips - whole).max() == 0


LARGE_IMAGE_PEAK = textwrap.dedent('''
    import resource, sys
    import numpy as np
    from PIL import Image
    from stackcat.features.images import image_embeddings

    class Mean:
        name = "mean-colour"
        def encode(self, images):
            return np.array([np.asarray(image, np.float32).mean((0, 1)) for image in images])

    image_embeddings([sys.argv[1]], Mean(), progress=False)  # warm up on the small image
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = image_embeddings([sys.argv[2]], Mean(), progress=False)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, result.status[0])
''')


@pytest.mark.slow
def test_a_large_transparent_image_costs_little_more_than_its_pixels(tmp_path):
    # 3000 x 3000 RGBA: 36 MB of pixels; converting it whole added 206 MB (copies for compositing), 63 now.
    Image.new("RGB", (16, 16), "red").save(tmp_path / "small.png")
    Image.new("RGBA", (3000, 3000), (10, 200, 30, 128)).save(tmp_path / "large.png")
    script = tmp_path / "peak.py"
    script.write_text(LARGE_IMAGE_PEAK)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "small.png"), str(tmp_path / "large.png")],
                          capture_output=True, text=True, timeout=120, check=True)
    added_mb, status = done.stdout.split()
    assert status == "ok" and int(added_mb) < 120, f"a 36 MB image added {added_mb} MB (206 MB before)"


def test_thin_images_keep_their_centre(tmp_path):
    path = tmp_path / "wide.png"
    pixels = np.zeros((2, 4000, 3), dtype=np.uint8)
    pixels[:, 1990:2010] = 255  # a white band in the middle
    Image.fromarray(pixels).save(path)
    image, status = images.load_image(path)
    assert status == "ok" and image.size == (2 * images.MAX_ASPECT_RATIO, 2)
    kept = np.asarray(image)  # columns 1980-2019 of the original
    assert kept[:, 10:30].min() == 255 and kept[:, :10].max() == 0 and kept[:, 30:].max() == 0


@pytest.mark.slow
def test_a_fit_logs_a_line_per_job_without_a_terminal(table, tmp_path):
    """No TTY, bars on: no bar characters in the captured output, and a time-stamped line per job."""
    options = [o for o in FIT_OPTIONS if o != "--no-progress"]
    options = [o if o != "toy" else "fasttext" for o in options]
    options += ["--param", "fasttext__dim=8", "--param", "fasttext__n_threads=1"]
    done = subprocess.run([sys.executable, "-m", "stackcat.cli", "fit", str(table), "--run-dir",
                           str(tmp_path / "run"), *options], capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr
    job_lines = [line for line in done.stdout.splitlines() if "[fasttext fold-" in line]
    assert len(job_lines) == 3 and all(line[2] == ":" and "fit" in line for line in job_lines)
    assert "\r" not in done.stdout + done.stderr and "it/s" not in done.stderr


def test_image_encoding_logs_its_count_and_rate(tmp_path, caplog):
    paths = write_images(tmp_path / "imgs", np.array(["a", "b", "a"]), COLOURS)
    with caplog.at_level("INFO", logger="stackcat"):
        images.image_embeddings(paths + [str(tmp_path / "missing.png")], CountingEncoder(name="log-test"),
                                progress=True)
    # rows 0 and 2 are the same picture: encoded once
    assert any("2 images encoded in" in r.message and "/s)" in r.message for r in caplog.records)


def test_bars_are_off_without_a_terminal():
    from stackcat.progress import progress_bar

    assert not sys.stderr.isatty()
    assert progress_bar(total=1, enabled=True).disable


def test_the_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert runs.current_umask() == 0o027 and runs.current_umask() == 0o027
    finally:
        os.umask(old)
