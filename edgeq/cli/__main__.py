"""`python -m edgeq.cli` is `edgeq`."""

from edgeq.cli import main

main()
