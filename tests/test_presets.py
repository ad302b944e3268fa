from __future__ import annotations

from dataclasses import replace

import pytest

from stackcat.presets import (
    FROZEN_BERT,
    FROZEN_FUSION,
    MODEL_NAMES,
    PRESETS,
    ModelOptions,
    build_models,
    get_preset,
    preset_members,
    preset_params,
    register_model,
    unregister_model,
)


def test_frozen_text_options_reach_bert_and_fusion(tmp_path):
    options = ModelOptions(text_model="/models/e5", image_encoder="efficientnet-lite0",
                           cache_dir=str(tmp_path), freeze_text_encoder=True)
    models = dict(build_models(["fasttext", "bert", "image", "fusion"], options, {"bert": {"epochs": 7}}))
    bert, fusion, image = models["bert"], models["fusion"], models["image"]
    assert bert.freeze_encoder and bert.lr == FROZEN_BERT["lr"] and bert.epochs == 7  # explicit params win
    assert bert.text_cache_dir == fusion.text_cache_dir == fusion.image_cache_dir == image.image_cache_dir == str(tmp_path)
    assert fusion.freeze_encoder and FROZEN_FUSION["freeze_encoder"]
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


def test_neighbours_share_the_text_and_image_settings_of_bert_and_image(tmp_path):
    options = ModelOptions(text_model="/models/e5", text_prefix="passage: ", image_encoder="efficientnet-lite0",
                           cache_dir=str(tmp_path), max_length=32, freeze_text_encoder=True)
    models = dict(build_models(["bert", "image", "knn_text", "knn_image", "lexical"], options))
    knn_text, knn_image, bert, image = models["knn_text"], models["knn_image"], models["bert"], models["image"]
    assert knn_text.source == "text" and knn_image.source == "image"
    assert (knn_text.model_name, knn_text.text_prefix, knn_text.max_length, knn_text.text_cache_dir) == \
        (bert.model_name, bert.text_prefix, bert.max_length, bert.text_cache_dir)
    assert (knn_image.encoder, knn_image.image_cache_dir) == (image.encoder, image.image_cache_dir)
    assert type(models["lexical"]).__name__ == "TfidfClassifier"


def test_register_model_adds_a_name_and_unregister_removes_it():
    from sklearn.naive_bayes import MultinomialNB

    from stackcat import presets

    register_model("nb_test", lambda options: MultinomialNB(alpha=options.random_state + 1.0))
    try:
        (name, model), = build_models(["nb_test"], ModelOptions(random_state=2), {"nb_test": {"fit_prior": False}})
        assert name == "nb_test" and model.alpha == 3.0 and not model.fit_prior
        assert "nb_test" in presets.MODEL_NAMES
    finally:
        unregister_model("nb_test")
    assert "nb_test" not in presets.MODEL_NAMES
    with pytest.raises(ValueError, match="unknown model"):
        build_models(["nb_test"])
    with pytest.raises(ValueError, match="built-in"):
        unregister_model("lexical")
    with pytest.raises(ValueError, match="comma"):
        register_model("a,b", lambda options: MultinomialNB())


def test_default_preset_keeps_the_members_whose_weights_are_at_hand():
    default = get_preset("default")
    assert preset_members(default, text_model=False, image_encoder=False, images=True) == ["fasttext", "lexical"]
    assert preset_members(default, text_model=True, image_encoder=True, images=False) == \
        ["fasttext", "lexical", "bert", "knn_text"]  # no photos in the table: no image members
    assert preset_members(default, text_model=True, image_encoder=True, images=True) == \
        ["fasttext", "lexical", "bert", "image", "fusion", "knn_text"]


def test_preset_params_are_overridden_key_by_key():
    best = get_preset("best")
    params = preset_params(best, ["bert", "image", "lexical"], {"bert": {"epochs": 2}, "lexical": {"C": 3.0}})
    assert params["bert"]["epochs"] == 2 and params["bert"]["tune_top_layers"] == best.params["bert"]["tune_top_layers"]
    assert params["image"] == dict(best.params["image"]) and params["lexical"] == {"C": 3.0}


def test_every_preset_builds_with_its_params():
    options = ModelOptions(text_model="/models/e5", image_encoder="efficientnet-lite0")
    for preset in PRESETS.values():
        names = preset_members(preset, text_model=True, image_encoder=True, images=True)
        assert set(names) <= set(MODEL_NAMES) and set(preset.params) <= set(names)
        built = dict(build_models(names, replace(options, **preset.options), preset_params(preset, names)))
        for name, params in preset.params.items():
            assert {k: built[name].get_params()[k] for k in params} == dict(params)


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match=r"unknown preset 'fast'; choose one of \['default', 'best'"):
        get_preset("fast")


def test_the_cli_describes_every_preset():
    from stackcat.cli import DEFAULT_PRESET, PRESET_COSTS

    assert list(PRESET_COSTS) == list(PRESETS) and DEFAULT_PRESET in PRESETS
