from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from stackcat.cli import EXIT_OK, EXIT_RUN_ERROR, EXIT_USAGE, main

FAST = ["--models", "fasttext", "--folds", "3", "--meta", "average", "--no-progress",
        "--param", "fasttext__n_threads=1", "--param", "fasttext__dim=16"]


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """One fit of the KazanExpress fixture, shared by the predict/evaluate tests."""
    from pathlib import Path

    folder = tmp_path_factory.mktemp("cli")
    train = folder / "ke.csv"
    shutil.copy(Path(__file__).parent / "data" / "ke_products.csv", train)
    run_dir = folder / "run"
    assert main(["fit", str(train), "--run-dir", str(run_dir), *FAST]) == EXIT_OK
    return train, run_dir


@pytest.mark.slow
def test_help_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "stackcat.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("fit", "predict", "evaluate", "demo"):
        assert command in result.stdout


@pytest.mark.slow
def test_fit_writes_a_complete_run_folder(fitted_run):
    _, run_dir = fitted_run
    for name in ("manifest.json", "stacker.joblib", "table.json", "data_problems.csv", "report.md"):
        assert (run_dir / name).exists(), name
    assert list(run_dir.glob("*.png"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["classes"]) == 4
    problems = pd.read_csv(run_dir / "data_problems.csv")
    assert sorted(problems["id"]) == [100006, 100015, 100024]


@pytest.mark.slow
def test_fit_refuses_an_existing_run_without_resume(fitted_run, capsys):
    train, run_dir = fitted_run
    assert main(["fit", str(train), "--run-dir", str(run_dir), *FAST]) == EXIT_USAGE
    assert "--resume" in capsys.readouterr().err
    assert main(["fit", str(train), "--run-dir", str(run_dir), "--resume", *FAST]) == EXIT_OK


def test_predict_writes_every_row_with_top5(fitted_run, tmp_path):
    train, run_dir = fitted_run
    test = tmp_path / "test.csv"
    pd.read_csv(train, dtype=str).drop(columns="category_id").to_csv(test, index=False)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), str(test), "--out", str(out), "--chunk-rows", "10"]) == EXIT_OK
    predictions = pd.read_csv(out)
    assert list(predictions.columns) == ["product_id", "category_id", "probability", "review",
                                         "top5_categories", "top5_probabilities"]
    assert len(predictions) == 36 and predictions["probability"].between(0, 1).all()
    assert len(json.loads(predictions["top5_categories"][0])) == 4  # only 4 classes exist


@pytest.mark.slow
def test_evaluate_oof_and_a_labelled_table_with_an_unseen_category(fitted_run, tmp_path, capsys):
    train, run_dir = fitted_run
    assert main(["evaluate", str(run_dir)]) == EXIT_OK
    assert "fasttext" in capsys.readouterr().out
    labelled = pd.read_csv(train, dtype=str)
    labelled.loc[0, "category_id"] = "99999"
    path = tmp_path / "labelled.csv"
    labelled.to_csv(path, index=False)
    assert main(["evaluate", str(run_dir), str(path)]) == EXIT_OK
    captured = capsys.readouterr()
    assert "unseen in training (99999)" in captured.err
    assert (run_dir / "evaluation-labelled" / "report.md").exists()


@pytest.mark.parametrize("argv, code, message", [
    (["fit", "missing.csv"], EXIT_RUN_ERROR, "missing.csv: no such file"),
    (["predict", "no-run", "x.csv", "--out", "y.csv"], EXIT_RUN_ERROR, "not a stackcat run folder"),
    (["fit"], EXIT_USAGE, "the following arguments are required"),
])
def test_errors_have_exit_codes_and_messages(argv, code, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if code == EXIT_USAGE:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == code
    else:
        assert main(argv) == code
    assert message in capsys.readouterr().err


def test_bad_param_is_a_usage_error(fitted_run, tmp_path, capsys):
    train, _ = fitted_run
    code = main(["fit", str(train), "--run-dir", str(tmp_path / "r"), "--param", "nope=1"])
    assert code == EXIT_USAGE and "MODEL__NAME=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_generic_table_needs_its_text_columns(tmp_path, capsys):
    path = tmp_path / "t.csv"
    pd.DataFrame({"name": ["a", "b"] * 5, "kind": ["x", "y"] * 5}).to_csv(path, index=False)
    assert main(["fit", str(path), "--run-dir", str(tmp_path / "r"), *FAST]) == EXIT_RUN_ERROR
    assert "--text-columns" in capsys.readouterr().err
    assert main(["fit", str(path), "--run-dir", str(tmp_path / "r"), "--text-columns", "name",
                 "--target", "kind", *FAST]) == EXIT_OK


def test_demo_pins_fasttext_to_one_thread_so_its_figures_repeat(tmp_path, monkeypatch):
    from stackcat import cli

    built = {}
    monkeypatch.setattr(cli, "_fit_and_report", lambda prepared, models, *args, **kwargs: built.update(models))
    main(["demo", "--models", "fasttext", "--rows", "200", "--run-dir", str(tmp_path / "demo")])
    assert built["fasttext"].get_params()["n_threads"] == 1


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "stackcat.cli", "demo", "--models", "fasttext", "--rows", "300",
         "--folds", "3", "--meta", "rerank", "--run-dir", str(tmp_path / "demo"), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report:" in result.stdout and (tmp_path / "demo" / "report.md").exists()


def _built_models(monkeypatch, argv):
    from stackcat import cli

    built = {}
    monkeypatch.setattr(cli, "_fit_and_report", lambda prepared, models, *args, **kwargs: built.update(models))
    assert main(argv) in (EXIT_OK, None)
    return built


def test_fit_builds_the_preset_and_explicit_flags_override_it(tmp_path, monkeypatch):
    from pathlib import Path

    from stackcat.presets import get_preset

    train = Path(__file__).parent / "data" / "ke_products.csv"
    common = ["fit", str(train), "--no-progress", "--text-model", "/models/e5"]
    plain = _built_models(monkeypatch, [*common, "--run-dir", str(tmp_path / "a")])
    assert list(plain) == ["fasttext", "lexical", "bert", "knn_text"]  # no photos: no image members
    assert plain["bert"].freeze_encoder  # the default preset freezes the encoder on any device
    best = _built_models(monkeypatch, [*common, "--run-dir", str(tmp_path / "b"), "--preset", "best",
                                       "--param", "bert__epochs=2", "--max-length", "40",
                                       "--no-freeze-text-encoder", "--models", "bert,lexical"])
    assert list(best) == ["bert", "lexical"]
    bert = best["bert"]
    assert bert.epochs == 2 and bert.max_length == 40 and not bert.freeze_encoder
    assert bert.tune_top_layers == get_preset("best").params["bert"]["tune_top_layers"]


def test_fit_refuses_an_unknown_preset_with_the_names_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "missing.csv", "--preset", "fastest", "--run-dir", str(tmp_path / "run")])
    assert info.value.code == EXIT_USAGE
    assert "invalid choice: 'fastest' (choose from 'default', 'best')" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_demo_takes_a_preset_and_keeps_its_own_settings(tmp_path, monkeypatch):
    from stackcat.presets import get_preset

    built = _built_models(monkeypatch, ["demo", "--preset", "best", "--models", "fasttext,bert", "--rows", "200",
                                        "--run-dir", str(tmp_path / "demo")])
    assert built["fasttext"].get_params()["n_threads"] == 1  # the demo's own param
    assert built["bert"].tune_top_layers == get_preset("best").params["bert"]["tune_top_layers"]
    assert built["bert"].max_length == 32  # the demo's text length wins over the preset's
