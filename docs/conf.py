"""Sphinx configuration for umilayers (built with ``sphinx-build -W``: warnings are errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from umilayers._version import __version__  # noqa: E402

project = "umilayers"
author = "umilayers developers"
release = version = __version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Shape", "params_style")]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Optional extras must not be needed to build the docs.
autodoc_mock_imports = ["xformers"]
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
