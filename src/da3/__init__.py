"""da3: memory-efficient multi-domain learning on the device."""

__version__ = "0.1.0"
