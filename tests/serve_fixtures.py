"""A toy predictor for the service's tests: naive Bayes on 4 classes, fitted in a second."""

from __future__ import annotations

from stackcat.data import TableSpec
from stackcat.predictor import Predictor
from stackcat.stacking import StackingCategorizer

from toy_models import NaiveBayesText, toy_table

TOY_SPEC = TableSpec(text_columns=["name"], attribute_columns=["colour"], id_column="sku", image_column="photo")


def toy_predictor() -> Predictor:
    X, y = toy_table(n_per_class=12)
    X["title"] = X["text"]
    X["image_path"] = None
    stack = StackingCategorizer([("nb", NaiveBayesText())], meta="average", n_splits=3, progress=False).fit(X, y)
    return Predictor.from_stack(stack, TOY_SPEC, model_version="toy-1")
