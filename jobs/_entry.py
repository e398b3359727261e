"""Shared launcher of the ``ray job submit`` entrypoints in this folder.

Every entrypoint is ``python jobs/<name>.py ARGS...``: it runs ``ccrk <command> ARGS...`` in the
job's driver process (on the head node of the cluster) and exits with the command's code (0 done,
1 nothing produced, 2 bad input). A new entrypoint is three lines::

    import sys
    from _entry import run
    if __name__ == "__main__":
        sys.exit(run("pretrain"))

Locations are configuration: ``${NAME}`` in an argument is replaced by the environment variable
NAME of the job's driver, i.e. what the cluster config (node environment) or the job's runtime env
(``env_vars``) sets, e.g. ``--data '${CCRK_DATA_URI}/test' --out '${CCRK_STORAGE_PATH}/eval'``.
``ray job submit`` quotes every argument, so with single quotes on the client the variable is
read on the cluster, not on the laptop. A variable that is not set is an error (exit 2), never an
empty path. Only the ``${NAME}`` form is expanded; a lone ``$`` stays as it is.

The code that runs is the code shipped with the job (``--working-dir .``): the folder above this
one goes first on ``sys.path``, ahead of any ``ccrk_ray`` installed on the node.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(REPO)]:         # the shipped code first, ahead of an installed ccrk_ray
    sys.path.insert(0, str(REPO))


def expand(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """``argv`` with every ``${NAME}`` replaced by ``environ[NAME]`` (``ccrk_ray.core.config.expand_vars``);
    a ConfigError names the unset (or empty) ones."""
    from ccrk_ray.core.config import expand_vars

    return expand_vars(list(argv), environ, where="arguments")


def run(command: str, argv: Sequence[str] | None = None) -> int:
    """``ccrk <command> <argv>`` (default argv: this process's arguments); returns its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from ccrk_ray.core.config import ConfigError

    try:
        args = expand(argv)
    except ConfigError as exc:
        print(f"ccrk {command}: error: {exc} on the cluster (set them in the cluster config or the job's "
              "runtime env: env_vars)", file=sys.stderr)
        return 2
    from ccrk_ray import cli

    print(f"ccrk {command}: running {Path(cli.__file__).resolve().parent}", flush=True)
    return cli.main([command, *args])
