"""`python -m rollouts_cli ...` is the `rollouts` command."""

import sys

from rollouts_cli.main import main

sys.exit(main())
