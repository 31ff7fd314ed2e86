"""`python -m sitctl ...` runs the command line, as the `sitctl` script does."""

from sitctl.cli import main

main()
