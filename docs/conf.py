"""Sphinx configuration of the API reference: built from the docstrings (``python -m sphinx -W -b html docs docs/_build``)."""

project = "torchrl-awr"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
exclude_patterns = ["_build"]
html_theme = "alabaster"
