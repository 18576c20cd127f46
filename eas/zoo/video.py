"""A torchvision-free stand-in for the video processor that several VLM processors require.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL, SmolVLM, InternVL and LLaVA-OneVision processors take a video processor
besides the image processor, and every video processor transformers ships imports torchvision, which this
project never installs. The service answers images only, so the processor gets this stand-in: it is a
`BaseVideoProcessor` (what the processor classes check for) and refuses any video with a clear error.
"""

from __future__ import annotations

from transformers.video_processing_utils import BaseVideoProcessor


class NoVideoProcessor(BaseVideoProcessor):
    """Accepts no videos; exists so that image-only processors can be built without torchvision."""

    def __call__(self, videos: object = None, **kwargs: object):
        raise ValueError("this model is served for images only: its processor has no video processor")

    preprocess = __call__


def _name_the_mixin() -> None:
    """Processors check a video processor against `transformers.VideoProcessorMixin`, which transformers only
    exports when torchvision is installed; name the (torchvision-free) mixin there so the check can run."""
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    try:
        present = isinstance(transformers.VideoProcessorMixin, type)
    except (AttributeError, ImportError):
        present = False
    if not present:
        transformers.VideoProcessorMixin = VideoProcessorMixin


_name_the_mixin()
