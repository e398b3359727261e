"""The Ray session of a command: how big a local cluster to start, and starting/joining/stopping it.

A command either joins the cluster named by ``RAY_ADDRESS`` (``ray job submit``, a cluster you
started) or starts a local one. A local cluster is sized from what the command's own actors and
tasks hold at once (``local_cpus``): a cluster whose CPUs are all held by actors never runs the
tasks those actors wait for (Ray Data's file listing and reads), and the command hangs.

Ray's own INFO/WARNING chatter, and error-level lines of normal operation (``RAY_NOISE``), are off
unless ``--verbose`` (``quiet_ray``, ``filter_worker_output``); errors still surface as
exceptions with their messages.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from ccrk_ray.core.log import get_logger, verbosity

log = get_logger(__name__)

# Environment of every process of a ccrk command (set before Ray is imported; passed to workers).
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Ray settings of a local cluster only (a cluster we join keeps its own):
# - Train's controller polls its workers every 2 s by default, which adds seconds to every start,
#   report and finish of a short run; one machine has no preemptible nodes to watch and no
#   metrics scraper;
# - Ray Data lists parquet footers with a pool of 32 actors per read (sized for many nodes reading
#   object storage); on one machine each is a process importing Ray Data for a few files' footers,
#   and one actor reading 128 footers at a time keeps up with any local disk or bucket.
LOCAL_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
}
# What one Ray Data pipeline of ours needs besides its actors: its list/read tasks.
DATA_TASK_CPUS = 1


def quiet_ray() -> dict[str, str]:
    """Set (without overriding the user's) the environment that keeps Ray quiet; returns what
    worker processes should get too."""
    env = dict(QUIET_ENV)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in env}


# Ray's Python loggers whose INFO/WARNING lines are progress notes, not problems (Ray Data warns that
# its progress bars are off, Ray Train reports every checkpoint at INFO); errors still show.
RAY_LOGGERS = {"ray": logging.ERROR, "ray.tune": logging.WARNING, "ray.train": logging.WARNING,
               "ray.data": logging.ERROR}
# A local cluster's raylet:
# - starts this many worker processes at once (Ray's default: one per CPU, and a raylet warning
#   each time more are running); our commands start a few actors and workers together;
# - starts no idle workers ahead of demand: Ray prestarts one per logical CPU when a driver
#   connects, but our commands run actors, each in a process of its own, so the prestarted ones
#   only import Ray and wait (measured: a dozen idle processes, ~20 CPU-s per cluster on 2 cores).
LOCAL_SYSTEM_CONFIG = {
    "worker_maximum_startup_concurrency": 16,
    "enable_worker_prestart": False,
    "prestart_worker_first_driver": False,
}


def quiet_ray_loggers(*extra: str) -> None:
    """Without --verbose, Ray's loggers (and ``extra`` logger names) show only what matters; call it
    in every process of ours that runs Ray code (the driver, each training worker)."""
    if verbosity() > 0:
        return
    for name, level in RAY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name in extra:
        logging.getLogger(name).setLevel(logging.WARNING)


# Error-level lines Ray's C++ core prints during normal operation, which ask nothing of the user.
# Ray Data always passes its actors' transform as an object-store reference while keeping actor
# restarts on (its fault tolerance), so every data actor pool logs this one "E" line.
RAY_NOISE = (
    re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
               r"and max_restarts > 0"),
)


def without_noise(lines: list[str]) -> list[str]:
    """``lines`` of a worker's output less the ``RAY_NOISE`` lines."""
    return [line for line in lines if not any(p.search(line) for p in RAY_NOISE)]


# Ray Train starts a placement-group cleaner (a detached helper actor) per training run; it finds the
# State API by looking for raylet processes on its machine, and where another Ray cluster runs there
# too (a second ccrk command, a `ray start` cluster) it cannot tell which is its own: its monitor
# thread dies with a 30-line traceback. Nothing of ours depends on it (a local cluster's placement
# groups end with the command), so the traceback becomes one line of ours.
CLEANER = "PlacementGroupCleaner"
CLEANER_LOST = re.compile(r"ConnectionError: Found multiple active Ray instances")
ANOTHER_CLUSTER = ("another Ray cluster runs on this machine: Ray Train's placement-group cleaner cannot tell "
                   "which is ours and stops watching (harmless here: this command's cluster ends with it)")


def cleaner_lost_its_cluster(data: dict) -> bool:
    """Whether a batch of worker output is the placement-group cleaner's traceback for a machine
    with more than one Ray cluster."""
    return data.get("actor_name") == CLEANER and any(CLEANER_LOST.search(line) for line in data.get("lines") or ())


def filter_worker_output() -> bool:
    """Without --verbose, drop ``RAY_NOISE`` lines from the worker output Ray prints in this (the
    driver's) process, and say the cleaner's lost cluster in one line; the workers' log files keep
    them. Ray has no public hook for this: the
    driver's printing handler is wrapped, and when Ray's internals differ nothing changes
    (returns False)."""
    if verbosity() > 0:
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        printers = [(n, h) for n, h in dispatcher.handlers if n == "ray_print_logs"]
    except (ImportError, AttributeError):
        return False
    if len(printers) != 1:
        return False
    (name, print_logs), = printers

    warned = []

    def print_filtered(data):
        if cleaner_lost_its_cluster(data):
            if not warned:
                log.warning(ANOTHER_CLUSTER)
                warned.append(True)
            return
        lines = without_noise(list(data.get("lines") or ()))
        if lines:
            print_logs({**data, "lines": lines})

    dispatcher.remove_handler(name)
    dispatcher.add_handler(name, print_filtered)
    return True


@contextmanager
def filtered_stderr() -> Iterator[None]:
    """Inside: this process's stderr (file descriptor 2, where Ray's C++ core of the driver writes
    its error-level lines) passes through a thread that drops ``RAY_NOISE`` lines. Python's own
    writes (tracebacks, progress bars) pass unchanged; on exit the real stderr is back and
    everything written is out. Without --verbose only; a no-op where fd 2 cannot be redirected."""
    if verbosity() > 0:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except (OSError, AttributeError, ValueError):
        yield
        return

    def forward() -> None:
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, partial = chunk.split(b"\n")    # a partial line (a progress bar's \r update) goes out as is
            kept = without_noise([line.decode("utf-8", "replace") for line in lines])
            out = "".join(line + "\n" for line in kept).encode() + partial
            if out:
                os.write(saved, out)
        os.close(read_end)

    thread = threading.Thread(target=forward, name="ccrk-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)                     # the pipe's last write end here closes: the thread drains it
        thread.join(timeout=2.0)              # (a Ray process still holding it only delays the end)
        os.close(saved)


def local_cpus(*holders: float, tasks: int = DATA_TASK_CPUS) -> int:
    """Logical CPUs for a local cluster whose actors and workers hold ``holders`` CPUs at once,
    plus ``tasks`` CPUs that stay free for the tasks they wait on. At least the machine's CPUs,
    so a run never sees fewer than it could use."""
    need = math.ceil(sum(holders) - 1e-9) + tasks
    return max(need, os.cpu_count() or 1)


def joining() -> bool:
    """Whether the command joins an existing cluster (``RAY_ADDRESS``) instead of starting one."""
    return bool(os.environ.get("RAY_ADDRESS"))


@contextmanager
def ray_session(num_cpus: int) -> Iterator[None]:
    """Join ``RAY_ADDRESS`` or start a local cluster of ``num_cpus`` logical CPUs; shut down on
    exit whatever this call started. Inside an already initialised session it does nothing."""
    import ray

    if ray.is_initialized():
        yield
        return
    with filtered_stderr():
        yield from _session(num_cpus)


def _session(num_cpus: int) -> Iterator[None]:
    import ray

    env = quiet_ray()
    quiet_ray_loggers()
    quiet = verbosity() <= 0
    kwargs = dict(log_to_driver=True, logging_level=logging.ERROR if quiet else logging.INFO)
    if joining():
        # a job's runtime env (ray job submit) is the cluster's business: ours would conflict with it
        log.debug("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        log.debug("starting a local Ray cluster of %d logical CPUs", num_cpus)
        for key, value in LOCAL_ENV.items():
            env[key] = os.environ.setdefault(key, value)
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env}, _system_config=LOCAL_SYSTEM_CONFIG, **kwargs)
    quiet_ray_loggers()
    filter_worker_output()
    try:
        yield
    finally:
        ray.shutdown()
