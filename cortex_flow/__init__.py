"""cortex-flow: declarative Redis Streams topologies."""

__version__ = "0.1.0"
