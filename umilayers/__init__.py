"""umilayers: PyTorch layers for *Learning Unseen Modality Interaction* (Zhang, Doughty, Snoek, NeurIPS 2023)."""

from umilayers._version import __version__

__all__ = ["__version__"]
