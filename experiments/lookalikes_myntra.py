"""Look-alike categories and suspected label errors on real path labels: Myntra's tree.

    PYTHONPATH=$PWD python -W ignore experiments/lookalikes_myntra.py --out artifacts/lookalikes_myntra

Labels are paths ``masterCategory > subCategory > articleType`` (the image subset,
text only), so the tree is read from them (``label_separator=" > "``); the stack is
the one of experiments/label_noise.py (lexical + fastText, ``meta="average"``).
Writes ``label_issues.csv``, ``lookalike_categories.csv`` and their report sections
(``sections.md``) into ``--out``, and prints the look-alike pairs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from label_noise import SPEC, members

from stackcat.data import prepare_table, read_table
from stackcat.report import catalogue_sections
from stackcat.stacking import StackingCategorizer


def path_labelled(data_dir: Path) -> pd.DataFrame:
    """The image subset's rows, articleType replaced by its path in the tree."""
    raw = read_table(data_dir / "styles_merged.csv")
    has_image = raw["id"].map(lambda i: (data_dir / "images_224" / f"{i}.jpg").exists()).to_numpy(dtype=bool)
    raw = raw[has_image].reset_index(drop=True)
    raw["articleType"] = raw["masterCategory"] + " > " + raw["subCategory"] + " > " + raw["articleType"]
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--out", type=Path, default=Path("artifacts/lookalikes_myntra"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    prepared = prepare_table(path_labelled(args.data), SPEC)
    stack = StackingCategorizer(members(args.epochs), meta="average", n_splits=5, random_state=0, progress=False,
                                verbose=0, retrieval=False, category_names=None, label_separator=" > ")
    start = time.perf_counter()
    stack.fit(prepared.frame, prepared.frame["label"].to_numpy(dtype=object))
    fitted = time.perf_counter() - start
    start = time.perf_counter()
    lines = catalogue_sections(stack, prepared, args.out)
    print(f"fit {fitted:.0f} s; label issues + look-alikes {time.perf_counter() - start:.2f} s; "
          f"{stack.tree_.depth}-level tree, {len(stack.classes_)} classes")
    (args.out / "sections.md").write_text("\n".join(lines) + "\n")
    print(pd.read_csv(args.out / "lookalike_categories.csv")[
        ["category_a", "category_b", "a_as_b", "b_as_a", "reasons", "action"]].to_string(index=False))


if __name__ == "__main__":
    main()
