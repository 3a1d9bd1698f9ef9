"""pytest plugin: after each test, the process's resident memory and its peak so far (MB) and the
test's id, appended to $MEMPLUG_OUT (default per_test_rss.txt). Linux only (/proc)."""

import os


def _rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pytest_runtest_logfinish(nodeid, location):
    with open(os.environ.get("MEMPLUG_OUT", "per_test_rss.txt"), "a") as f:
        f.write(f"{_rss_mb():7.0f} {_peak_mb():7.0f} {nodeid}\n")
