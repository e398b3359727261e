"""Where the test suite's CPU work goes: the machine's busy CPU-seconds during each test.

    .venv/bin/python benchmarks/suite_work.py [--top 25] [--json OUT] [pytest args, default: -m ray]

Runs pytest in one process (no xdist), so everything the machine does while a test runs (its
``ccrk`` subprocesses, their Ray clusters, actors and workers) is that test's: busy ticks from
/proc/stat (user + nice + system + irq + softirq) around each test's setup, call and teardown.
A module's shared fixture counts where it is set up, as in ``--durations``. Wall time on 2
cores can shrink by packing work better but never below work ÷ cores: this says which tests to
make cheaper when ``.ci/run``'s total grows. Linux only (/proc/stat); run on an otherwise idle
machine (the idle machine's own background, measured before the run, is printed beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """The machine's busy CPU-seconds since boot (all CPUs)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / TICK


class WorkPlugin:
    """Busy CPU-seconds and wall seconds per test, written to ``out`` as JSON at the end."""

    def __init__(self, out: Path):
        self.out, self.rows = out, []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item):
        busy, wall = busy_seconds(), time.perf_counter()
        yield
        self.rows.append({"test": item.nodeid, "cpu_s": round(busy_seconds() - busy, 2),
                          "wall_s": round(time.perf_counter() - wall, 2)})

    def pytest_sessionfinish(self):
        self.out.write_text(json.dumps(self.rows, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=25, help="tests to print, most CPU work first")
    parser.add_argument("--json", type=Path, help="also write every test's row here")
    parser.add_argument("--idle-seconds", type=float, default=20, help="how long to measure the idle machine first")
    args, pytest_args = parser.parse_known_args(argv)
    if not Path("/proc/stat").is_file():
        sys.exit("suite_work.py reads /proc/stat: Linux only")
    if args.json:
        rows_file = args.json
    else:
        fd, name = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        rows_file = Path(name)
    before = busy_seconds()
    time.sleep(args.idle_seconds)
    idle_load = (busy_seconds() - before) / args.idle_seconds
    # pytest in a child process, this module as its plugin: the child's imports are the suite's own
    code = ("import sys, pytest; from pathlib import Path; sys.path.insert(0, %r); import suite_work; "
            "sys.exit(pytest.main(sys.argv[1:], plugins=[suite_work.WorkPlugin(Path(%r))]))"
            % (str(Path(__file__).parent), str(rows_file)))
    t0, b0 = time.perf_counter(), busy_seconds()
    rc = subprocess.call([sys.executable, "-c", code, "-p", "no:xdist", "-q", *(pytest_args or ["-m", "ray"])],
                         cwd=REPO)
    wall, work = time.perf_counter() - t0, busy_seconds() - b0
    rows = json.loads(rows_file.read_text() or "[]")      # empty: pytest stopped before its end
    if not args.json:
        rows_file.unlink()
    with open("/proc/stat") as f:      # the CPUs its busy ticks sum over
        cores = sum(1 for line in f if line[:3] == "cpu" and line[3].isdigit())
    print(f"\n{len(rows)} tests, pytest exit {rc}: {wall:.0f} s wall, {work:.0f} CPU-s busy on {cores} cores "
          f"({100 * work / (cores * wall):.0f} % of their time); the idle machine: {idle_load:.2f} CPU-s per s")
    total = sum(r["cpu_s"] for r in rows) or 1
    print(f"{'CPU-s':>7} {'share':>6} {'wall s':>7}  test (most work first)")
    for r in sorted(rows, key=lambda r: -r["cpu_s"])[:args.top]:
        print(f"{r['cpu_s']:7.1f} {100 * r['cpu_s'] / total:5.1f}% {r['wall_s']:7.1f}  {r['test']}")
    modules: dict[str, list[float]] = {}
    for r in rows:
        m = modules.setdefault(r["test"].split("::")[0], [0.0, 0.0])
        m[0], m[1] = m[0] + r["cpu_s"], m[1] + r["wall_s"]
    print(f"\n{'CPU-s':>7} {'share':>6} {'wall s':>7}  module")
    for name, (cpu, wall_s) in sorted(modules.items(), key=lambda kv: -kv[1][0]):
        print(f"{cpu:7.1f} {100 * cpu / total:5.1f}% {wall_s:7.1f}  {name}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
