"""The package version (ground floor: the commands and exports stamp it without importing the package root)."""
__version__ = "0.1.0"
