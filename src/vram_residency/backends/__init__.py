"""Device memory backends: ``host`` (an emulation in host RAM) and ``cuda`` (real VRAM)."""
