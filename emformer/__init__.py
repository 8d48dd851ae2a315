"""emformer: transformers that cluster Gaussian mixtures in context.

`from emformer import Clusterer` loads an exported model without importing lightning or deepspeed.
"""
from __future__ import annotations

from typing import Any

from emformer.version import __version__
__all__ = ["Clusterer", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Clusterer":
        # Lazy (the Clusterer imports torch) so that `import emformer` stays cheap for every subcommand.
        from emformer.models.clusterer import Clusterer

        return Clusterer
    raise AttributeError(f"module 'emformer' has no attribute {name!r}")
