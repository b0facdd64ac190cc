"""`python -m mediator` runs the command line."""

from mediator.cli import main

main()
