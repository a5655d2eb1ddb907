"""Run a benchmark in a network namespace that has nothing but loopback, where the machine allows it."""

from __future__ import annotations

import os
import shutil
import sys

_MARK = "AVATAR_RTC_NETNS"


def reexec_in_loopback_namespace() -> None:
    """As root, re-execute this script under ``unshare -n`` with only ``lo`` up (once); otherwise
    return and rely on every peer connection being pinned to 127.0.0.1."""
    if os.geteuid() != 0 or os.environ.get(_MARK) or shutil.which("unshare") is None:
        return
    os.environ[_MARK] = "1"
    command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
    os.execvp("unshare", command)
