"""python -m adaccel_client: the adaccel-client command."""

import sys

from adaccel_client.cli import main

sys.exit(main())
