"""Structural verdict of eas.model.arch on every image-text-to-text class of the installed transformers.

    .venv/bin/python -m tests.families.survey > /tmp/survey.tsv

Each class is built from its default config on the meta device (no memory, no weights), so only the
structural checks run (decoder location, block form, gated FFN, q/k/v); the numerical probe runs when a real
model is converted. docs/eas-core.md's "Every class" table is this output. Classes whose default config
cannot be built here (missing optional packages such as timm, or configs that need arguments) are listed
as such.
"""

from __future__ import annotations

import warnings

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from eas.model.arch import UnsupportedModelError, locate_decoder


def verdict(model_type: str, class_name: str) -> str:
    try:
        config = CONFIG_MAPPING[model_type]()
        with torch.device("meta"):
            model = getattr(transformers, class_name)(config)
    except Exception as exc:  # optional packages missing, configs that need arguments
        return f"not built here ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc).strip() else ''})"
    try:
        decoder = locate_decoder(model)
    except UnsupportedModelError as exc:
        return f"refused: {exc}"
    forms = "/".join(sorted({f.name for f in decoder.forms}))
    return f"accepted: {type(decoder.layers[0]).__name__}, {forms}"


def main() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    for model_type, class_name in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items()):
        print(f"{model_type}\t{class_name}\t{verdict(model_type, class_name)}", flush=True)


if __name__ == "__main__":
    main()
