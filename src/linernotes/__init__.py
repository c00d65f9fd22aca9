"""linernotes: credit for AI music.

Training-data attribution by unlearning, and opt-out unlearning, for text-to-music diffusion models.
"""

from linernotes.errors import LinernotesError

__all__ = ["LinernotesError", "__version__"]
__version__ = "0.1.0"
