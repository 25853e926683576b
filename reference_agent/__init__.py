"""The reference agent: a SIMULATOR of a NeMo Gym agent server, for demos, tests and benchmarks.

Not part of the collector: ``rollouts`` never imports it; the command serves it
(``rollouts serve-agent``), as does ``python -m reference_agent``.

* ``server``: the task family, the simulated policy and verifier, the aiohttp server.
* ``args``: its command-line flags, apart from the server, so that building the command's
  parser does not import aiohttp's web server (nothing is imported here for the same reason).
* ``capacity``: the processor-sharing model behind ``--capacity``.
"""
