import sys

from ccrk_ray.cli import main

sys.exit(main())
