"""recare: concept erasure for Stable Diffusion that keeps co-occurring retained concepts.

Implements ReCARE, "Co-occurring Associated REtained concepts in Diffusion Unlearning"
(ICLR 2026), with ESD and STEREO baselines from the same code.
"""

from recare.errors import RecareError

__version__ = "0.1.0"

__all__ = ["RecareError", "__version__"]
