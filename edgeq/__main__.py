"""`python -m edgeq` is `edgeq`."""

from edgeq.cli import main

main()
