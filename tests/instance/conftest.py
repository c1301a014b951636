from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitwise.cluster import LocalCluster
from splitwise.engine.tiny_model import default_model_dir
from tests.instance.helpers import has_failed, start_cluster


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return default_model_dir("tiny")


@pytest.fixture()
def cluster_factory(tiny_model: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    started: list[LocalCluster] = []

    def make(**spec: object) -> LocalCluster:
        cluster = start_cluster(tiny_model, **spec)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        kept = cluster.stop(keep_logs=has_failed(request))  # a failed test keeps the instances' logs
        if kept is not None:
            print(f"cluster logs kept in {kept}")
