"""mimco: MimCo pre-training (masked image modeling with a frozen contrastive teacher)."""

from mimco.errors import MimcoError

__version__ = "0.1.0"
__all__ = ["MimcoError", "__version__"]
