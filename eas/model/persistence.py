"""Save and load EAS-converted models (placeholder until the core lands)."""

from __future__ import annotations

import json
from pathlib import Path


def is_converted(path: Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return "eas" in config.get("text_config", config)


def load_converted(path: Path):
    raise NotImplementedError("converted-model loading lands with the EAS core")
