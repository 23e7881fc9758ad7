"""pyflm: a Python re-implementation of MOSFLM (ipmosflm)."""

__version__ = "0.1.0"
