"""``ccrk paper-tables`` as a Ray job::

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/paper_tables.py --config CONFIG.yaml --start-from '${CCRK_STORAGE_PATH}/pretrain/model'

ARGS are those of ``ccrk paper-tables`` (``ccrk paper-tables --help``). ``${VAR}`` in them, and in the
config file's values, is read from the cluster's environment (see jobs/_entry.py). Submitting the
same command again continues: runs that finished are not run again.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("paper-tables"))
