"""A converted directory in plain transformers: exact with trust_remote_code=True, refused without
(issue 15, item 3; eas/model/artefact.py, eas/model/remote.py).

Negative control: the first format (what `save_pretrained` wrote before) loads silently through the
stock class as a different model — the failure these tests exist to catch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from transformers.dynamic_module_utils import get_imports

import eas.model.remote as remote
import model_store
from eas.manifest import verify_manifest
from eas.model.fold import fold_model
from eas.model.loading import load_model
from eas.model.persistence import load_converted, save_converted, upgrade_format
from eas.model.plan import SkipPlan
from eas.model.processors import load_processor
from eas.zoo.families import FAMILIES
from tests.core.helpers import converted_llava, llava_batch
from tests.core.test_family_exactness import converted_family, family_batch
from tests.core.test_stock_generate import converted_qwen2vl

SHIPPED = Path(model_store.__file__).resolve().parent / "embedded" / "easy-vqa-llava-eas"


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _config(directory: Path) -> dict:
    """config.json without the `dtype` entries, which record the dtype a model was loaded in."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "dtype"}
        return value

    return strip(json.loads((directory / "config.json").read_text()))


def _family(name: str, merged: bool):
    if name == "llava":
        model, processor = converted_llava((0, 2))
        batch = llava_batch(processor)
    else:
        model, batch = converted_qwen2vl((0, 2))
        processor = None
    if merged:
        fold_model(model)
    return model, processor, batch, (LlavaForConditionalGeneration if name == "llava"
                                     else Qwen2VLForConditionalGeneration)


@pytest.mark.parametrize(("name", "merged"), [("llava", False), ("qwen2vl", True)])  # folded: every family below
def test_trust_remote_code_loads_the_exact_model(tmp_path: Path, name: str, merged: bool) -> None:
    model, processor, batch, _ = _family(name, merged)
    save_converted(model, tmp_path, processor)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is type(model)
    assert (_logits(loaded, batch) - _logits(model, batch)).abs().max() <= 1e-5
    for use_cache in (True, False):  # layer 0 skipped, left-padded: its own generate is the exact one
        ours = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=use_cache)
        theirs = loaded.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=use_cache)
        assert torch.equal(ours, theirs)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.get_text_config(decoder=True).eas["plan"]["skipped"] == [0, 2]
    base = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype="bfloat16")
    assert base.dtype == torch.bfloat16 and type(base) is type(model)


@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_without_trust_remote_code_every_entry_point_refuses(tmp_path: Path, name: str) -> None:
    model, processor, _, stock_cls = _family(name, merged=True)
    save_converted(model, tmp_path, processor)
    for entry in (AutoConfig, AutoModel, AutoModelForImageTextToText):
        for flag in ({}, {"trust_remote_code": False}):
            with pytest.raises(ValueError, match="trust_remote_code=True"):
                entry.from_pretrained(tmp_path, **flag)
    with pytest.raises(OSError, match=r"model\.safetensors"):
        stock_cls.from_pretrained(tmp_path)


def test_negative_control_first_format_is_misread_by_the_stock_class(tmp_path: Path) -> None:
    model, processor, batch, stock_cls = _family("llava", merged=True)
    type(model).save_pretrained(model, tmp_path)  # the stock save: the first format
    processor.save_pretrained(tmp_path)
    misread = stock_cls.from_pretrained(tmp_path)  # no error...
    assert (_logits(misread, batch) - _logits(model, batch)).abs().max() > 1e-2  # ...and a different model
    loaded, _ = load_converted(tmp_path)  # the project's loader still reads it exactly
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_upgrade_rewrites_the_first_format_with_the_same_tensors(tmp_path: Path) -> None:
    model, processor, batch, _ = _family("llava", merged=True)
    type(model).save_pretrained(model, tmp_path)
    processor.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name not in ("config.json", "model.safetensors")}
    assert upgrade_format(tmp_path) and not upgrade_format(tmp_path)
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "model.eas.safetensors").is_file()
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())  # other files untouched
    verify_manifest(tmp_path, require=True)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_remote_model_saved_again_is_the_same_artefact(tmp_path: Path) -> None:
    model, processor, _, _ = _family("llava", merged=True)
    first, second = tmp_path / "a", tmp_path / "b"
    save_converted(model, first, processor)
    AutoModelForImageTextToText.from_pretrained(first, trust_remote_code=True).save_pretrained(second)
    assert (second / "modeling_eas.py").read_text() == (first / "modeling_eas.py").read_text()
    assert _config(second) == _config(first)
    a, b = load_file(first / "model.eas.safetensors"), load_file(second / "model.eas.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_remote_code_is_self_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """modeling_eas.py imports no `eas` module: it loads and generates while every `eas` import fails."""
    model, processor = converted_llava((1, 3))
    save_converted(model, tmp_path, processor)
    assert not [i for i in get_imports(tmp_path / "modeling_eas.py") if i.split(".")[0] == "eas"]
    for name in [n for n in sys.modules if n == "eas" or n.startswith("eas.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import eas...` now raises ImportError
    with pytest.raises(ImportError):
        import eas.model.convert  # noqa: F401
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    ids = torch.tensor([[1, 5, 6, 7]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(loaded.generate(**kwargs), model.generate(**kwargs))


def test_bundler_refuses_a_name_defined_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    original = remote._load

    def clashing(name: str):
        module = original(name)
        if name == "eas.model.cache":
            module.defined["SkipPlan"] = "SkipPlan = None"
        return module

    monkeypatch.setattr(remote, "_load", clashing)
    with pytest.raises(remote.BundleError, match="SkipPlan"):
        remote.remote_source.__wrapped__()


def test_shipped_conversion_is_format_2_and_a_fixed_point(tmp_path: Path) -> None:
    """The shipped demo conversion: its manifest holds, plain transformers loads it exactly with the flag,
    and the current exporter writes back the same config and tensors."""
    verify_manifest(SHIPPED, require=True)
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == "eas" and (SHIPPED / "modeling_eas.py").is_file()
    served = load_model(SHIPPED, device="cpu")
    assert served.plan == SkipPlan.from_json((SHIPPED / "plan.json").read_text())
    processor = AutoProcessor.from_pretrained(SHIPPED)
    image = Image.new("RGB", (64, 64), "red")
    batch = served.prepare([image, image], ["what colour is the shape?", "what shape is it?"])
    remote_model = AutoModelForImageTextToText.from_pretrained(SHIPPED, trust_remote_code=True)
    assert torch.equal(_logits(remote_model, batch), _logits(served.model, batch))
    save_converted(served.model, tmp_path, processor)
    assert _config(tmp_path) == _config(SHIPPED)
    a, b = load_file(SHIPPED / "model.eas.safetensors"), load_file(tmp_path / "model.eas.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_recorded_token_reduction_is_reinstalled(tmp_path: Path) -> None:
    from eas.model.token_reduction import TokenReduction, install_reduction, token_reducer

    model, processor, batch, _ = _family("llava", merged=True)
    install_reduction(model, TokenReduction(keep_fraction=0.25, criterion="cls"))
    save_converted(model, tmp_path, processor)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    reducer = token_reducer(loaded)
    assert reducer is not None and type(reducer).__module__.endswith("modeling_eas")  # the bundle's own
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    ids = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(loaded.generate(**batch, **ids), model.generate(**batch, **ids))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_supported_family_loads_exactly_in_plain_transformers(tmp_path: Path, name: str) -> None:
    model, processor = converted_family(name)
    fold_model(model)
    batch = family_batch(processor)
    save_converted(model, tmp_path, processor if hasattr(processor, "save_pretrained") else None)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is type(model)
    assert (_logits(loaded, batch) - _logits(model, batch)).abs().max() <= 1e-5
    options = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(loaded.generate(**batch, **options), model.generate(**batch, **options))


def test_the_project_never_runs_a_directorys_code(tmp_path: Path) -> None:
    """load_model and the import check read EAS directories themselves and refuse any other remote code
    without running it (and without transformers' interactive prompt)."""
    from eas.manifest import ModelFilesError
    from eas.model.checkpoint import CheckpointError, check_checkpoint

    model, processor = converted_llava((1, 3))
    save_converted(model, tmp_path / "eas", processor)
    with pytest.raises(CheckpointError, match="already EAS-converted"):
        check_checkpoint(tmp_path / "eas")
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.Config"}}))
    with pytest.raises(ModelFilesError, match="contains custom code"):
        load_model(evil, device="cpu", verify=False)
    with pytest.raises(CheckpointError, match="contains custom code"):
        check_checkpoint(evil)
    assert not marker.exists()



@pytest.mark.parametrize("name", ["llava", "llava-onevision"])
def test_load_model_never_asks_to_run_the_directory_code(tmp_path: Path, name: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted directory names its own code in auto_map; the project's loader (model and processor, the
    torchvision-free fallback included: LLaVA-OneVision) must neither run it nor reach transformers'
    interactive trust prompt, which waits for input under a pipe and fails in a loader thread. Negative
    control: the stock AutoConfig without trust_remote_code does reach the prompt on the same directory."""
    from transformers import AutoConfig

    prompts: list[str] = []

    def answer_no(question: str = "") -> str:  # recorded, not raised: transformers swallows errors of input()
        prompts.append(question)
        return "n"

    model, processor = converted_family(name)
    processor.save_pretrained(tmp_path / "source")  # as the pipeline does: the source's processor, reloaded
    directory = save_converted(fold_model(model), tmp_path / name, load_processor(tmp_path / "source"))
    monkeypatch.setattr("builtins.input", answer_no)
    loaded = load_model(directory, device="cpu")
    assert prompts == []
    assert loaded.plan is not None and loaded.plan.skipped == tuple(model.config.get_text_config().eas["plan"]
                                                                     ["skipped"])
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoConfig.from_pretrained(directory)
