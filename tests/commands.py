"""Run ``ccrk`` as a user does: a subprocess that starts its own local Ray cluster (no fixture
cluster, no ``RAY_ADDRESS``), with a timeout, its output kept for assertions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What a person should not have to read from a ccrk command: Ray's own INFO/WARNING lines, its
# C++ components' error-level start-up notes, Ray Data's banners and Ray Train's per-report notes.
RAY_NOISE = re.compile(r"\bINFO\b|\bWARNING\b|core_worker|worker processes have been started|Progress bars|"
                       r"Registered dataset logger|Starting execution of Dataset|Checkpoint successfully created|"
                       r"Reporting training result|usage_lib|dashboard")


def ccrk(*args: str, timeout: float = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    ray = sys.modules.get("ray")
    assert "RAY_ADDRESS" in (env or {}) or ray is None or not ray.is_initialized(), \
        "a fixture cluster runs in the test process: the command would start a second one beside it"
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    res = subprocess.run([sys.executable, "-m", "ccrk_ray", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO, env=environ)
    if check:
        assert res.returncode == 0, f"ccrk {' '.join(map(str, args))} exited {res.returncode}:\n" \
                                    f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def noise(res: subprocess.CompletedProcess) -> list[str]:
    """The lines of a run's output that are Ray's chatter, not ours."""
    return [line for line in (res.stdout + res.stderr).splitlines() if RAY_NOISE.search(line)]
