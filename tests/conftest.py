from __future__ import annotations

import os

import pytest

from modelnet_p2p.log import quiet_libp2p

quiet_libp2p()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fd_count():
    return open_fds
