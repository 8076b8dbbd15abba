"""The ``lstmlab`` sub-commands, one module each with ``add_arguments(parser)`` and ``run(args) -> int``. A command
turns flags into calls of the library (``lstmlab.training``, ``lstmlab.analysis``, ``lstmlab.nn``, ...) and never
imports another command."""
