"""pibake: bake configured Raspberry Pi OS images for a small cluster."""

__version__ = "0.1.0"
