"""Load a model directory's processor without torchvision.

transformers 5.23 ships only torchvision-based video processors, and several VLM processors (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, SmolVLM, InternVL, LLaVA-OneVision) hold one next to their image processor, so
`AutoProcessor.from_pretrained` refuses those directories when torchvision is absent (it never is
installed here). The service answers images only: `load_processor` builds the directory's own processor
class from its saved image processor (the PIL backend) and tokenizer, with `NoVideoProcessor` in the video
slot. Directories that load with AutoProcessor are loaded that way, unchanged.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin
from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin


class NoVideoProcessor(BaseVideoProcessor):
    """Accepts no videos; exists so that image-only processors can be built without torchvision."""

    def __call__(self, videos: object = None, **kwargs: object):
        raise ValueError("this model is served for images only: its processor has no video processor")

    preprocess = __call__


def _name_the_mixin() -> None:
    """Processors check a video processor against `transformers.VideoProcessorMixin`, which transformers only
    exports when torchvision is installed; name the (torchvision-free) mixin there so the check can run."""
    import transformers

    try:
        present = isinstance(transformers.VideoProcessorMixin, type)
    except (AttributeError, ImportError):
        present = False
    if not present:
        transformers.VideoProcessorMixin = VideoProcessorMixin


_name_the_mixin()


def load_processor(path: str | Path) -> ProcessorMixin:
    """The directory's processor: AutoProcessor's, or, where only its video processor needs torchvision,
    the same processor class with NoVideoProcessor in the video slot. A directory's own code is never run."""
    from eas.model.artefact import is_eas_directory, quiet_transformers

    if is_eas_directory(path):
        # The tokenizer loader reads config.json as a generic config and warns that type `eas` is not the
        # processor's model type on every load: expected for a converted directory (docs/eas-core.md).
        with quiet_transformers():
            return _load_processor(path)
    return _load_processor(path)


def _load_processor(path: str | Path) -> ProcessorMixin:
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=False)  # never run a directory's code
    except ValueError as exc:
        if "torchvision" not in str(exc):
            raise
        refusal = exc
    from transformers.models.auto.processing_auto import processor_class_from_name

    processor_dict, kwargs = ProcessorMixin.get_processor_dict(str(path))
    name = processor_dict.get("processor_class")
    cls = processor_class_from_name(name) if name else None
    if cls is None or "video_processor" not in cls.get_attributes():
        raise refusal
    args = []
    for attribute in cls.get_attributes():
        if attribute == "tokenizer":
            args.append(AutoTokenizer.from_pretrained(path, trust_remote_code=False))
        elif attribute == "image_processor":
            args.append(AutoImageProcessor.from_pretrained(path, trust_remote_code=False))
        elif attribute == "video_processor":
            args.append(NoVideoProcessor())
        else:
            raise refusal
    return cls.from_args_and_dict(args, processor_dict, **kwargs)
