"""`python -m rotator.cli`."""

from rotator.cli import main

main()
