"""One module per ``ccrk`` subcommand: ``HELP``, ``add_arguments(parser)`` and ``main(args) -> exit code``."""
