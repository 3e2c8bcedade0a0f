"""The package's version, importable without anything else of the package.

May import: nothing of the package.
"""

__version__ = "0.2.0"
