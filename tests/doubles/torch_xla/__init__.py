"""TEST DOUBLE of `torch_xla` (written by us): import-only placeholders.

Run with USE_TORCH_XLA=0, or diffusers / accelerate take this placeholder for a real XLA device.
"""

from torch_xla import core, runtime  # noqa: F401

__version__ = "2.8.0+test.double"
