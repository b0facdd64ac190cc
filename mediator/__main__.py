"""`python -m mediator` runs the command line."""

from mediator.cli.commands import main

main()
