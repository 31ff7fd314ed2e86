"""`python -m sitctl.bench`."""

from sitctl.bench.cli import main

main()
