"""attnserve: attention models from PyTorch to production."""

__version__ = "0.1.0"
