import sys

from instantdl_ray.cli import main

sys.exit(main())
