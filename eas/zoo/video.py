"""The torchvision-free video-processor stand-in, re-exported for the zoo (it lives in eas.model.processors,
which the loader uses)."""

from eas.model.processors import NoVideoProcessor

__all__ = ["NoVideoProcessor"]
