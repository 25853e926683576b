"""``python -m reference_agent --port 8765 --latency-ms 50``: the simulator on its own."""

import sys

from reference_agent.server import main

main(sys.argv[1:])
