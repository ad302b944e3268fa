"""Top-layer tuning on cached states: ``BertClassifier(freeze_encoder=True, tune_top_layers=k)``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_bert import GROUPS, tiny_clf, toy_data

from stackcat.features import text_states
from stackcat.features.hub import load_text_encoder, transformer_layers
from stackcat.features.text_states import clear_memory_cache, token_states
from stackcat.models.batching import pad_states
from stackcat.models.bert import BertClassifier, MeanPoolingClassifier, TopLayersClassifier
from stackcat.stacking import StackingCategorizer

from contract import check_fitted_contract, check_sklearn_contract
from tiny_bert import build_tiny_bert
from toy_models import NaiveBayesText

MAX_LENGTH = 32
TESTS_DIR = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    texts, _ = toy_data()
    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-top"), texts))


def top_clf(model_name, k=1, **params) -> BertClassifier:
    return tiny_clf(model_name, freeze_encoder=True, tune_top_layers=k, **params)


def full_and_top(model_name, k, n_classes=4):
    """The untrained full-forward module and the top-k module, sharing one head."""
    encoder, tokenizer = load_text_encoder(model_name)
    full = MeanPoolingClassifier(encoder, n_classes, dropout=0.0).eval()
    top = TopLayersClassifier(encoder, k, n_classes, dropout=0.0).eval()
    top.head.load_state_dict(full.head.state_dict())
    return full, top, tokenizer


@pytest.mark.parametrize("k", [1, 2])
def test_untrained_cached_path_equals_the_full_forward_pass(tiny_model, k):
    texts, _ = toy_data(repeat=1)
    full, top, tokenizer = full_and_top(tiny_model, k)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    cached = token_states(texts, tiny_model, MAX_LENGTH, below_top_layers=k, progress=False)
    assert [len(s) for s in cached] == batch["attention_mask"].sum(dim=1).tolist()
    with torch.no_grad():
        expected = full(batch["input_ids"], batch["attention_mask"])
        # the exact fp32 states below the top k layers: equal up to float rounding
        below = full.encoder(**batch, output_hidden_states=True).hidden_states[-k - 1]
        np.testing.assert_allclose(top(below, batch["attention_mask"]), expected, rtol=0, atol=1e-5)
        # the cached (float16) states, padded per batch as in training
        np.testing.assert_allclose(top(*pad_states(cached)), expected, rtol=0, atol=2e-3)


def test_untrained_estimator_module_starts_from_the_pretrained_top_layers(tiny_model):
    X, y = toy_data()
    clf = top_clf(tiny_model, k=1, epochs=1, lr=1e-12, head_lr=1e-12).fit(X, y)
    encoder, _ = load_text_encoder(tiny_model)
    pretrained = transformer_layers(encoder)[-1].state_dict()
    for name, value in clf.module_.top_layers[0].state_dict().items():
        torch.testing.assert_close(value, pretrained[name], rtol=0, atol=1e-6)


def test_store_keys_change_with_the_encoder_k_and_max_length(tiny_model, tmp_path, monkeypatch):
    texts, _ = toy_data(repeat=1)
    other_model = str(build_tiny_bert(tmp_path / "other", texts, seed=1))
    cache = tmp_path / "states"
    settings = [(tiny_model, 32, 0), (tiny_model, 32, 1), (tiny_model, 32, 2), (tiny_model, 16, 1),
                (other_model, 32, 1)]
    first = {s: token_states(texts, s[0], s[1], cache_dir=cache, below_top_layers=s[2], progress=False)
             for s in settings}
    assert len({p.name for p in cache.iterdir()}) == len(settings)  # one namespace each
    for a in settings:
        for b in settings:
            if a < b and a[1] == b[1]:  # same token count: the states themselves differ
                assert not all(np.array_equal(x, y) for x, y in zip(first[a], first[b])), (a, b)

    clear_memory_cache()
    monkeypatch.setattr(text_states, "_runner_for", lambda *a, **k: pytest.fail("encoded again"))
    for setting, states in first.items():
        again = token_states(texts, setting[0], setting[1], cache_dir=cache, below_top_layers=setting[2],
                             progress=False)
        for x, y in zip(again, states):
            np.testing.assert_array_equal(x, y)


def test_sklearn_checks_with_top_layers():
    check_sklearn_contract(BertClassifier(freeze_encoder=True, tune_top_layers=1))


def test_contract_top_layers(tiny_model, tmp_path):
    X, y = toy_data(["a shirt", "jeans & co", "wallet", "running shoes"])
    clf = top_clf(tiny_model, k=1, epochs=4, head_lr=3e-2, text_cache_dir=str(tmp_path))
    proba = check_fitted_contract(clf, X, y, ["red cotton shirt", "denim", "new\nline text", ""])
    assert clf.classes_[proba[0].argmax()] == "a shirt"
    assert clf.tuned_layers_ == 1 and len(clf.module_.top_layers) == 1


def test_top_layers_learn_and_the_head_only_stage_leaves_them_alone(tiny_model):
    X, y = toy_data()
    clf = top_clf(tiny_model, k=2, epochs=6, head_lr=3e-2, train_encoder_after=1).fit(X, y)
    assert [h["stage"] for h in clf.history_] == ["head"] + ["top2"] * 5
    assert clf.history_[-1]["train_loss"] < clf.history_[0]["train_loss"]
    unseen = ["cotton shirt red 99", "jeans denim blue women", "wallet black leather", "shoes running"]
    assert clf.predict(unseen).tolist() == list(GROUPS)

    encoder, _ = load_text_encoder(tiny_model)
    after_head = top_clf(tiny_model, k=2, epochs=1, head_lr=3e-2, train_encoder_after=1).fit(X, y)
    for tuned, pretrained in zip(after_head.module_.top_layers, transformer_layers(encoder)):
        for name, value in tuned.state_dict().items():
            torch.testing.assert_close(value, pretrained.state_dict()[name], rtol=0, atol=0)


def test_save_load_round_trip_predicts_the_same(tiny_model, tmp_path):
    X, y = toy_data(["a shirt", "jeans", "wallet", "shoes"])
    clf = top_clf(tiny_model, k=1, epochs=2, head_lr=3e-2).fit(X, y)
    folder = clf.save(tmp_path / "model")
    assert {p.name for p in folder.iterdir()} == {"head.pt", "estimator.json"}  # no encoder copy
    loaded = BertClassifier.load(folder, device="cpu")
    assert loaded.tuned_layers_ == 1
    np.testing.assert_allclose(loaded.predict_proba(X), clf.predict_proba(X), rtol=0, atol=1e-6)


def test_top_layers_need_a_frozen_encoder(tiny_model):
    X, y = toy_data()
    with pytest.raises(ValueError, match="tune_top_layers=1 needs freeze_encoder=True"):
        tiny_clf(tiny_model, tune_top_layers=1).fit(X, y)


def test_more_layers_than_the_encoder_has_is_refused_before_encoding(tiny_model, monkeypatch):
    X, y = toy_data()
    monkeypatch.setattr(text_states, "_runner_for", lambda *a, **k: pytest.fail("encoded texts first"))
    with pytest.raises(ValueError, match="tune_top_layers=3, but .* has 2 transformer layers"):
        top_clf(tiny_model, k=3).fit(X, y)


def test_a_changed_checkpoint_is_refused_at_load(tiny_model, tmp_path):
    X, y = toy_data()
    model = tmp_path / "copy"
    build_tiny_bert(model, X)
    clf = top_clf(str(model), k=1, epochs=1).fit(X, y)
    folder = clf.save(tmp_path / "saved")
    build_tiny_bert(model, X, seed=3)  # new weights in the same folder
    clear_memory_cache()
    with pytest.raises(ValueError, match="has changed since this model was fitted"):
        BertClassifier.load(folder)


# --------------------------------------------------------------------------- kill -9 during a tune, then resume

KILL_DRIVER = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, os.environ["TOP_TESTS_DIR"])
    from stackcat.models.bert import TopLayersClassifier
    from test_top_layers import stack_for, toy_stack_data

    kill_at, steps = int(os.environ["KILL_AT_STEP"]), [0]
    forward = TopLayersClassifier.forward

    def counted_forward(self, *args, **kwargs):
        if self.training:
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, *args, **kwargs)

    TopLayersClassifier.forward = counted_forward
    stack_for(sys.argv[1], sys.argv[2]).fit(*toy_stack_data())
''')
TRAINING_STEPS_PER_JOB = 2 * 7  # epochs x batches of 8 (53 or 54 rows: the lone last row joins a batch)


def toy_stack_data():
    X, y = toy_data()
    return pd.DataFrame({"text": X}), np.asarray(y, dtype=object)


def stack_for(model_name: str, run_dir: str) -> StackingCategorizer:
    model = top_clf(model_name, k=1, epochs=2, head_lr=3e-2, text_cache_dir=str(Path(run_dir).parent / "cache"))
    return StackingCategorizer([("nb", NaiveBayesText()), ("top1", model)], meta="average", n_splits=3,
                               random_state=0, run_dir=run_dir, progress=False, verbose=0)


def job_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.glob("jobs/*/*.oof.npz"))}


@pytest.mark.slow
def test_kill_during_a_top_layer_tune_then_resume_recomputes_only_that_job(tiny_model, tmp_path, monkeypatch):
    reference = stack_for(tiny_model, str(tmp_path / "reference")).fit(*toy_stack_data())
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER, encoding="utf-8")
    run_dir = tmp_path / "run"
    env = {**os.environ, "TOP_TESTS_DIR": str(TESTS_DIR), "KILL_AT_STEP": str(TRAINING_STEPS_PER_JOB + 5),
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(driver), tiny_model, str(run_dir)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    before = job_files(run_dir)
    assert sum("top1" in name for name in before) == 1, sorted(before)  # killed in the second tune

    fits = []
    monkeypatch.setattr(BertClassifier, "fit", counting(BertClassifier.fit, fits, "top1"))
    monkeypatch.setattr(NaiveBayesText, "fit", counting(NaiveBayesText.fit, fits, "nb"))
    resumed = stack_for(tiny_model, str(run_dir)).fit(*toy_stack_data())
    after = job_files(run_dir)
    assert {name: after[name] for name in before} == before  # finished jobs were reused, not redone
    assert len(fits) == len(after) - len(before)  # every job without a file ran once, no other
    assert fits.count("top1") == 3 - sum("top1" in name for name in before)
    for name, matrix in reference.oof_.items():
        np.testing.assert_allclose(resumed.oof_[name], matrix, rtol=0, atol=1e-6)


def counting(fit, calls: list[str], name: str):
    def counted(self, *args, **kwargs):
        calls.append(name)
        return fit(self, *args, **kwargs)
    return counted


@pytest.mark.slow
def test_bundle_round_trip_keeps_the_tuned_layers(tmp_path):
    from test_bundle import fit_predictor

    from stackcat.bundle import load_bundle

    from toy_models import toy_table

    tiny_model = str(build_tiny_bert(tmp_path / "tiny-bert", toy_table()[0]["text"]))
    top = BertClassifier(model_name=tiny_model, freeze_encoder=True, tune_top_layers=1, epochs=2, lr=1e-3,
                         head_lr=1e-2, max_length=16, batch_size=8, progress=False, n_threads=1, random_state=0)
    predictor, X = fit_predictor([("top1", top)])
    folder = predictor.save(tmp_path / "model")
    assert not list(folder.rglob("model.safetensors")), "the frozen encoder is referenced, not copied"
    loaded = load_bundle(folder)
    assert loaded.stack.fold_models_["top1"][0].tuned_layers_ == 1
    before, after = predictor.stack.predict_results(X), loaded.stack.predict_results(X)
    for name in before:
        assert np.abs(np.asarray(before[name]) - np.asarray(after[name])).max() <= 1e-6, name
