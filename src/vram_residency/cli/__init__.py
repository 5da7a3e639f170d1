"""The ``vram-residency`` command line."""
