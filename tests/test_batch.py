"""Batch prediction on a dask cluster: the same file as a local `stackcat predict`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from stackcat.cli import EXIT_OK, main


@pytest.mark.slow
@pytest.mark.dask
def test_predict_on_a_local_cluster_equals_the_local_output(tmp_path):
    distributed = pytest.importorskip("distributed")
    train = tmp_path / "ke.csv"
    shutil.copy(Path(__file__).parent / "data" / "ke_products.csv", train)
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main(["fit", str(train), "--run-dir", str(run_dir), "--models", "fasttext,lexical", "--folds", "3",
                 "--meta", "average", "--no-progress", "--param", "fasttext__n_threads=1",
                 "--param", "fasttext__dim=16"]) == EXIT_OK
    assert main(["export", str(run_dir), str(bundle)]) == EXIT_OK
    table = tmp_path / "test.csv"
    pd.read_csv(train, dtype=str).drop(columns="category_id").sample(frac=1, random_state=0).to_csv(table,
                                                                                                index=False)
    local, remote = tmp_path / "local.csv", tmp_path / "cluster.csv"
    assert main(["predict", str(bundle), str(table), "--out", str(local)]) == EXIT_OK
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                                  processes=True) as cluster:
        assert main(["predict", str(bundle), str(table), "--out", str(remote), "--chunk-rows", "5",
                     "--scheduler", cluster.scheduler_address]) == EXIT_OK
    assert remote.read_bytes() == local.read_bytes()
    ids = pd.read_csv(remote, dtype=str)["product_id"].tolist()
    assert ids == pd.read_csv(table, dtype=str)["product_id"].tolist()
