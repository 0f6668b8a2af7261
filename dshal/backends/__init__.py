"""Backends built into the ``dshal`` distribution (each one is also a ``dshal.backends`` plugin)."""
