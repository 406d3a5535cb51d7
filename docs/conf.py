"""Sphinx configuration for torch_arena's documentation (``make docs``)."""

project = "torch_arena"
author = "the torch_arena developers"
copyright = "2026, the torch_arena developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
html_static_path = ["_static"]
exclude_patterns = ["_build"]
nitpicky = False
