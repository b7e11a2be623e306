"""One module per `marscale` sub-command: each has `add_arguments(parser)` and `run(args)`."""
