"""dshal-minimal: an example dshal backend plugin (see docs/backends.md)."""
