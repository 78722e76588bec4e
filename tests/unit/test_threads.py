import math
import os

import pytest
import torch

from personalab.engine import threads
from personalab.engine.threads import available_cores, cgroup_quota, set_threads
from personalab.errors import InvalidInputError


def test_cgroup_quotas(tmp_path):
    assert cgroup_quota(tmp_path) is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_quota(tmp_path) == 2.5


def test_available_cores_is_the_affinity_capped_by_the_quota(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert available_cores() == affinity
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 0.5)
    assert available_cores() == 1
    monkeypatch.setattr(threads, "cgroup_quota", lambda: affinity + 3.0)
    assert available_cores() == affinity
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 1.2)
    assert available_cores() == min(affinity, math.ceil(1.2))


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads() == available_cores() == torch.get_num_threads()
        with pytest.raises(InvalidInputError, match="`threads` is 0"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
