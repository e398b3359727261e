"""``ccrk pretrain`` as a Ray job::

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/pretrain.py --config CONFIG.yaml ...

ARGS are those of ``ccrk pretrain`` (``ccrk pretrain --help``). ``${VAR}`` in them, and in the config
file's values, is read from the cluster's environment (see jobs/_entry.py). Submitting the same
command again with ``--resume`` continues the run from its latest checkpoint in the config's
storage path (e.g. after the cluster lost its nodes).
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("pretrain"))
