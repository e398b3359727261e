"""One module per ``ccrk`` subcommand: ``add_arguments(parser)`` and ``main(args) -> exit code``;
the one-line help of each lives in ``ccrk_ray.cli.COMMANDS``."""
