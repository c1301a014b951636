"""LocalCluster.stop() keeps the instances' logs when asked (a failed test or start) and reports
where; otherwise its own temp folder goes (#13: no leftover temp dirs). A caller's folder stays."""

from __future__ import annotations

import shutil
from pathlib import Path

from splitwise.cluster import ClusterSpec, LocalCluster


def _cluster(log_dir: Path | None = None) -> LocalCluster:
    cluster = LocalCluster(ClusterSpec(model="unused"), log_dir=log_dir)
    (cluster.log_dir / "decode-0.log").write_text("why it failed\n")
    return cluster


def test_stop_removes_its_own_log_folder_by_default() -> None:
    cluster = _cluster()
    assert cluster.stop() is None
    assert not cluster.log_dir.exists()


def test_stop_keeps_the_logs_when_asked_and_says_where() -> None:
    cluster = _cluster()
    kept = cluster.stop(keep_logs=True)
    try:
        assert kept == cluster.log_dir
        assert (kept / "decode-0.log").read_text() == "why it failed\n"
    finally:
        shutil.rmtree(cluster.log_dir)


def test_a_callers_log_folder_is_never_removed(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    assert cluster.stop() == tmp_path
    assert (tmp_path / "decode-0.log").exists()
