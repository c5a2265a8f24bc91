"""Fleet tests: a real three-member etcd cluster and real gpud processes (process runtime) on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.etcdcluster import EtcdCluster
from tests.fleet.fleethosts import Fleet


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three etcd members on loopback ports, stopped at the end."""
    cluster = EtcdCluster(tmp_path / "etcd")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def fleet(etcd: EtcdCluster) -> Iterator[Fleet]:
    """Three gpud hosts a, b, c (GPUs 0:low, 1:high each) registered in `etcd`, stopped at the end."""
    hosts = Fleet(etcd)
    try:
        hosts.start("a", "b", "c")
        yield hosts
    finally:
        hosts.close()
