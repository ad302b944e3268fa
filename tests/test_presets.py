from __future__ import annotations

import pytest

from stackcat.presets import FROZEN_BERT, FROZEN_FUSION, ModelOptions, build_models


def test_frozen_text_options_reach_bert_and_fusion(tmp_path):
    options = ModelOptions(text_model="/models/e5", image_encoder="efficientnet-lite0",
                           cache_dir=str(tmp_path), freeze_text_encoder=True)
    models = dict(build_models(["fasttext", "bert", "clip", "fusion"], options, {"bert": {"epochs": 7}}))
    bert, fusion, clip = models["bert"], models["fusion"], models["clip"]
    assert bert.freeze_encoder and bert.lr == FROZEN_BERT["lr"] and bert.epochs == 7  # explicit params win
    assert bert.cache_dir == fusion.text_cache_dir == fusion.image_cache_dir == clip.cache_dir == str(tmp_path)
    assert fusion.epochs == FROZEN_FUSION["epochs"] == 0
    assert bert.model_name == fusion.model_name == "/models/e5"


def test_fine_tuning_is_the_default():
    bert = dict(build_models(["bert"]))["bert"]
    assert not bert.freeze_encoder and bert.model_name == "cointegrated/rubert-tiny2"


def test_unknown_model_names_are_listed():
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['svm'\]"):
        build_models(["fasttext", "svm"])


def test_text_prefix_reaches_the_text_models():
    options = ModelOptions(text_model="/models/e5", text_prefix="passage: ")
    models = dict(build_models(["bert", "fusion"], options))
    assert models["bert"].text_prefix == models["fusion"].text_prefix == "passage: "
    assert models["bert"]._texts(["Red shirt"]) == ["passage: Red shirt"]
