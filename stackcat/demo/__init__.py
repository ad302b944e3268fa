"""The small real data set embedded in stackcat (Myntra fashion products).

2,005 products, 75 ``articleType`` classes with a long tail, one 128 px photo
each. See ``README.md`` in this folder for provenance and how it was drawn
(``experiments/build_demo_data.py`` rebuilds it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["DEMO_COLUMNS", "demo_csv_path", "demo_image_dir", "load_demo"]

#: How the demo table maps onto the library's data layer.
DEMO_COLUMNS: dict[str, object] = {
    "text_columns": ["productDisplayName"],
    "attribute_columns": ["gender", "baseColour", "season", "usage"],
    "target": "articleType",
    "id_column": "id",
    "image_column": "image_path",
}

_HERE = Path(__file__).resolve().parent


def demo_csv_path() -> Path:
    """Return the absolute path of the packaged ``products.csv``.

    Returns
    -------
    pathlib.Path
        Path of the demo table shipped inside the package.
    """
    return _HERE / "products.csv"


def demo_image_dir() -> Path:
    """Return the absolute path of the packaged image folder (``<id>.jpg``)."""
    return _HERE / "images"


def _stratified_counts(counts: pd.Series, n_rows: int) -> pd.Series:
    """Rows to draw per class: proportional, largest remainder, every class kept when possible.

    When ``n_rows`` is at least the number of classes, each class keeps at least
    one row (so the long tail survives subsampling); the rest is split in
    proportion to class sizes, never more than a class has.
    """
    total = int(counts.sum())
    exact = counts.to_numpy(dtype=float) * n_rows / total
    take = np.floor(exact).astype(int)
    if n_rows >= len(counts):
        take = np.maximum(take, 1)
    take = np.minimum(take, counts.to_numpy())
    remainder = exact - take
    # Give missing rows to the largest remainders (ties: larger class, then name order).
    order = np.lexsort((np.arange(len(counts)), -counts.to_numpy(), -remainder))
    i = 0
    while take.sum() < n_rows:
        k = order[i % len(order)]
        if take[k] < counts.iloc[k]:
            take[k] += 1
        i += 1
    # Forced minimums may overshoot: take back from the classes furthest above their share.
    while take.sum() > n_rows:
        excess = np.where(take > 1, take - exact, -np.inf)
        take[int(np.argmax(excess))] -= 1
    return pd.Series(take, index=counts.index)


def load_demo(n_rows: int | None = None, random_state: int = 0) -> tuple[pd.DataFrame, Path]:
    """Load the embedded demo data set (real Myntra fashion products).

    Parameters
    ----------
    n_rows : int or None, default=None
        Number of rows to keep. ``None`` returns every row. Otherwise a
        stratified subsample by ``articleType``: each class keeps a share
        proportional to its size, and at least one row while ``n_rows`` is
        at least the number of classes. Rows keep the table's order.
    random_state : int, default=0
        Seed of the subsample; the same seed gives the same rows.

    Returns
    -------
    frame : pandas.DataFrame
        Columns ``id, productDisplayName, gender, baseColour, season, year,
        usage, articleType, image_path``, index ``0..n-1``. Text columns have
        ``object`` dtype (missing values are ``NaN``); ``image_path`` holds
        the absolute path of each product's JPEG. See :data:`DEMO_COLUMNS`
        for the roles of the columns.
    image_dir : pathlib.Path
        Folder of the images, one ``<id>.jpg`` per product.

    Raises
    ------
    ValueError
        If ``n_rows`` is not a positive integer no larger than the table.

    Examples
    --------
    >>> from stackcat.demo import DEMO_COLUMNS, load_demo
    >>> frame, image_dir = load_demo(n_rows=300, random_state=0)
    >>> frame.shape
    (300, 9)
    >>> frame[DEMO_COLUMNS["target"]].nunique()
    75
    >>> (image_dir / f"{frame['id'].iloc[0]}.jpg").exists()
    True
    """
    frame = pd.read_csv(demo_csv_path())
    image_dir = demo_image_dir()
    frame["image_path"] = [str(image_dir / f"{i}.jpg") for i in frame["id"]]
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            frame[column] = frame[column].astype(object)

    if n_rows is not None:
        if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)):
            raise ValueError(f"n_rows must be a positive integer or None, got {n_rows!r}")
        if not 1 <= n_rows <= len(frame):
            raise ValueError(
                f"n_rows must be between 1 and {len(frame)} (the demo's size), got {n_rows}"
            )
        target = DEMO_COLUMNS["target"]
        counts = frame[target].value_counts().sort_index()
        take = _stratified_counts(counts, int(n_rows))
        rng = np.random.default_rng(random_state)
        keep: list[int] = []
        for label, k in take.items():
            if k:
                members = np.flatnonzero((frame[target] == label).to_numpy())
                keep.extend(rng.choice(members, size=int(k), replace=False).tolist())
        frame = frame.iloc[np.sort(keep)].reset_index(drop=True)
    return frame, image_dir
