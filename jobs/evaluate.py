"""``ccrk evaluate`` as a Ray job::

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/evaluate.py ARGS...

ARGS are those of ``ccrk evaluate`` (``ccrk evaluate --help``); ``${VAR}`` in them is read from the
cluster's environment (see jobs/_entry.py).
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("evaluate"))
