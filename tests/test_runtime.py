"""The driver's filter of Ray's worker output: error-level lines of normal operation are dropped
from what a person reads, every other line (errors included) is printed as before."""

from __future__ import annotations

import os

from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from ccrk_ray.core import log as ccrk_log
from ccrk_ray.core.runtime import ANOTHER_CLUSTER, filter_worker_output, filtered_stderr, without_noise

RESTART_NOTE = ("[2026-12-01 21:27:01,510 E 6367 6575] core_worker.cc:2465: Actor with class name: "
                "'MapWorker(MapBatches(StreamTransform))' and ID: '5fb1d25d54f41bfe3a3c87bf01000000' has constructor "
                "arguments in the object store and max_restarts > 0. If the arguments in the object store go out of "
                "scope or are lost, the actor restart will fail.")
REAL_ERROR = "[2026-12-01 21:27:02,000 E 6367 6575] core_worker.cc:900: Failed to connect to the raylet"


def test_without_noise_drops_only_the_restart_note():
    lines = ["epoch 1 loss 0.5", RESTART_NOTE, REAL_ERROR, "Traceback (most recent call last):"]
    assert without_noise(lines) == ["epoch 1 loss 0.5", REAL_ERROR, "Traceback (most recent call last):"]


def _with_printer(verbose: int, monkeypatch):
    printed: list[list[str]] = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", lambda data: printed.append(data["lines"]))]
    monkeypatch.setitem(ccrk_log._state, "verbosity", verbose)
    try:
        wrapped = filter_worker_output()
        dispatcher.emit({"pid": 1, "is_err": True, "lines": [RESTART_NOTE, REAL_ERROR]})
        dispatcher.emit({"pid": 1, "is_err": True, "lines": [RESTART_NOTE]})
    finally:
        dispatcher.handlers = saved
    return wrapped, printed


def test_the_driver_prints_worker_output_without_the_noise_unless_verbose(monkeypatch):
    wrapped, printed = _with_printer(0, monkeypatch)
    assert wrapped and printed == [[REAL_ERROR]]          # a batch of only noise prints nothing
    wrapped, printed = _with_printer(1, monkeypatch)
    assert not wrapped and printed == [[RESTART_NOTE, REAL_ERROR], [RESTART_NOTE]]


# The end of the traceback Ray Train's placement-group cleaner printed (Ray 2.60) while a second
# local cluster ran on the machine.
CLEANER_TRACEBACK = [
    "Exception in thread PlacementGroupCleanerMonitor:", "Traceback (most recent call last):",
    '  File ".../ray/dashboard/utils.py", line 687, in ray_address_to_api_server_url',
    "    address = services.canonicalize_bootstrap_address_or_die(address)",
    '  File ".../ray/_private/services.py", line 759, in canonicalize_bootstrap_address_or_die',
    "    raise ConnectionError(",
    "ConnectionError: Found multiple active Ray instances: {'192.0.2.2:42171', '192.0.2.2:40783'}. Please specify "
    "the one to connect to by setting the `--address` flag or `RAY_ADDRESS` environment variable."]


def test_the_cleaners_lost_cluster_is_one_line_of_ours_once(monkeypatch, caplog):
    printed: list[list[str]] = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", lambda data: printed.append(data["lines"]))]
    monkeypatch.setitem(ccrk_log._state, "verbosity", 0)
    try:
        with caplog.at_level("WARNING", logger="ccrk_ray"):
            assert filter_worker_output()
            for pid in (1, 2):                        # one cleaner per training run
                dispatcher.emit({"pid": pid, "is_err": True, "actor_name": "PlacementGroupCleaner",
                                 "lines": CLEANER_TRACEBACK})
            # another actor's traceback, or the cleaner's for another reason, is printed as it is
            dispatcher.emit({"pid": 3, "is_err": True, "actor_name": "RayTrainWorker", "lines": CLEANER_TRACEBACK})
            dispatcher.emit({"pid": 1, "is_err": True, "actor_name": "PlacementGroupCleaner",
                             "lines": CLEANER_TRACEBACK[:-1] + ["ValueError: something else"]})
    finally:
        dispatcher.handlers = saved
    assert [r.getMessage() for r in caplog.records] == [ANOTHER_CLUSTER]
    assert printed == [CLEANER_TRACEBACK, CLEANER_TRACEBACK[:-1] + ["ValueError: something else"]]


def test_the_drivers_own_stderr_loses_the_noise_and_keeps_everything_else(capfd, monkeypatch):
    """Ray's C++ core in the driver writes to file descriptor 2 directly, not through Python."""
    monkeypatch.setitem(ccrk_log._state, "verbosity", 0)
    with filtered_stderr():
        os.write(2, f"{RESTART_NOTE}\n{REAL_ERROR}\n".encode())
        os.write(2, b"\r 50%|#####     | progress")
    assert capfd.readouterr().err == f"{REAL_ERROR}\n\r 50%|#####     | progress"
    monkeypatch.setitem(ccrk_log._state, "verbosity", 1)
    with filtered_stderr():
        os.write(2, f"{RESTART_NOTE}\n".encode())
    assert capfd.readouterr().err == f"{RESTART_NOTE}\n"
