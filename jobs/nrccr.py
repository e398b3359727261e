"""``ccrk nrccr`` as a Ray job::

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/nrccr.py train --config ccrk_ray/configs/nrccr/multi30k_task1_de.yaml --set 'data.train=${CCRK_DATA_URI}/multi30k/train'

ARGS are those of ``ccrk nrccr`` (``train``, ``evaluate`` or ``demo``; ``ccrk nrccr ACTION --help``).
``${VAR}`` in them, and in the config file's values, is read from the cluster's environment (see
jobs/_entry.py). Submitting ``train`` again with ``--resume`` continues from the latest checkpoint.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("nrccr"))
