"""Peak resident memory of one command, for scripts/bench.py and tests/test_perf_paths.py."""

from __future__ import annotations

import subprocess
import sys

# A parent with no other child reports the command's ru_maxrss as its children's peak.
_PROBE = (
    "import resource, subprocess, sys;"
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss_kib(command: list[str]) -> int:
    """Peak RSS in KiB of `command`, run to completion (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *command], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())
