"""``ccrk tune`` as a Ray job::

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/tune.py --task multi30k --config CONFIG.yaml --checkpoint CKPT --num-samples 16

ARGS are those of ``ccrk tune`` (``ccrk tune --help``). ``${VAR}`` in them, and in the config file's
values, is read from the cluster's environment (see jobs/_entry.py). The trials share the cluster
(``--max-concurrent``, default: as many as its CPUs/GPUs hold). Submitting the same command again
with ``--resume`` finishes an interrupted sweep: finished trials are kept, unfinished ones continue
from their latest checkpoint. ``output_dir`` must be on a filesystem every node sees.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("tune"))
