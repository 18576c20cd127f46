"""`eas --help` stays fast: importing the command line loads none of the heavy stacks (torch, transformers,
the service, the model store), which the commands import only when they run. (Its wall time is not asserted:
on a shared CPU it varies several-fold; the import set is what makes it fast.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import eas_tools.common

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "transformers", "safetensors", "PIL", "pydantic", "fastapi", "uvicorn", "service.app",
         "service.settings", "model_store", "easy_vqa")


def test_importing_the_cli_loads_no_heavy_module() -> None:
    code = ("import json, sys; import eas_tools.cli; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                            check=True)
    assert json.loads(result.stdout) == []


def test_help_lists_every_subcommand() -> None:
    result = subprocess.run([sys.executable, "-m", "eas_tools.cli", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for name in ("serve", "import", "convert", "eval", "bench", "train-default"):
        assert f" {name} " in result.stdout


def test_the_light_spelling_of_easy_vqa_is_the_loader_s() -> None:
    from eas.conversion.data import EASY_VQA

    assert eas_tools.common.EASY_VQA == EASY_VQA
