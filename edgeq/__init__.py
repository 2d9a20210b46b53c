"""edgeq: make a language model run well on a specific device, offline."""

__version__ = "0.1.0"
