"""The one place the package version is defined (read by pyproject.toml and ``umilayers.__version__``)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
