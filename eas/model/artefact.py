"""The on-disk form of a converted model: plain transformers loads it exactly or refuses (issue 15, item 3).

A converted directory (format 2, written by `eas.model.persistence.save_converted` and by
`save_pretrained` on any converted model) differs from a stock one in three places:
- `config.json` names `model_type: "eas"` and `architectures: ["EASModel"]`; the stock model type and
  architecture are kept under `eas_base`, and `auto_map` points every Auto class at `modeling_eas.py`;
- the weights are saved under the `eas` variant (`model.eas.safetensors`, or
  `model.safetensors.index.eas.json` and its shards), so no stock class finds `model.safetensors`;
- `modeling_eas.py` is the EAS runtime, self-contained (eas.model.remote bundles it from this package:
  it imports torch, transformers and pydantic, never `eas`).

With `trust_remote_code=True`, `AutoConfig` / `AutoModel` / `AutoModelForImageTextToText` /
`AutoModelForCausalLM` run `EASConfig` and `EASModel` below: the stock config is rebuilt from
`eas_base`, the stock class loads the stock tensors, and `rebuild` re-applies the conversion and loads
the EAS tensors strictly — the exact converted model, with the exact `generate`
(eas.model.stock_generate). Without the flag, the Auto classes refuse (an unknown model type with
remote code), and every stock class's `from_pretrained` refuses (no `model.safetensors`).

The first format (stock `config.json` with `text_config.eas`, `model.safetensors`) is still read by
eas.model.persistence; only transformers alone misreads it.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers import PretrainedConfig, PreTrainedModel

from eas.model.arch import locate_decoder
from eas.model.convert import apply_plan, stored_conversion

MODEL_TYPE = "eas"
WEIGHTS_VARIANT = "eas"
BASE_KEY = "eas_base"
REMOTE_MODULE = "modeling_eas"
REMOTE_FILE = REMOTE_MODULE + ".py"
CONFIG_CLASS = "EASConfig"
MODEL_CLASS = "EASModel"
AUTO_CLASSES = ("AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM")
CONFIG_FILE = "config.json"


class ArtefactError(ValueError):
    """A converted directory is incomplete or does not match its own plan."""


# --- config.json ---------------------------------------------------------------------------------


def is_eas_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def is_eas_directory(path: str | Path) -> bool:
    """Whether `path/config.json` is a format-2 EAS config (False when it is absent or unreadable)."""
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and is_eas_config(config)


def to_disk_config(stock: dict[str, Any]) -> dict[str, Any]:
    """The format-2 config.json of a converted model from its stock config dict."""
    out = {k: v for k, v in stock.items() if k not in ("model_type", "architectures", "auto_map")}
    out[BASE_KEY] = {"model_type": stock["model_type"], "architectures": list(stock.get("architectures") or [])}
    out["model_type"] = MODEL_TYPE
    out["architectures"] = [MODEL_CLASS]
    out["auto_map"] = {"AutoConfig": f"{REMOTE_MODULE}.{CONFIG_CLASS}",
                       **{auto: f"{REMOTE_MODULE}.{MODEL_CLASS}" for auto in AUTO_CLASSES}}
    return out


def from_disk_config(config: dict[str, Any]) -> dict[str, Any]:
    """The stock config dict back from a format-2 config.json."""
    base = config.get(BASE_KEY)
    if not is_eas_config(config) or not isinstance(base, dict) or not base.get("architectures"):
        raise ArtefactError(f"not an EAS config.json (model_type {config.get('model_type')!r}, no {BASE_KEY})")
    out = {k: v for k, v in config.items() if k not in (BASE_KEY, "auto_map")}
    out["model_type"] = base["model_type"]
    out["architectures"] = list(base["architectures"])
    return out


def stock_config(config: dict[str, Any], **kwargs: Any) -> Any:
    """A stock config object from a stock config dict (kwargs as for `PretrainedConfig.from_dict`)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ArtefactError(f"the converted model's base type {model_type!r} is unknown to transformers "
                            f"{transformers.__version__}")
    return CONFIG_MAPPING[model_type].from_dict(dict(config), **kwargs)


def stored_conversion_dict(config: Any) -> dict[str, Any] | None:
    """The raw `text_config.eas` record of a stock config object, or None."""
    raw = getattr(config.get_text_config(decoder=True), "eas", None)
    return raw if isinstance(raw, dict) else None


def stock_class(config: Any) -> type[PreTrainedModel]:
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ArtefactError(f"the converted model's base architecture {arch!r} is unknown to transformers "
                            f"{transformers.__version__}")
    return cls


def rewrite_saved_config(directory: str | Path) -> None:
    """Turn the stock config.json that `save_pretrained` wrote into the format-2 one, in place."""
    path = Path(directory) / CONFIG_FILE
    config = json.loads(path.read_text())
    if not is_eas_config(config):
        path.write_text(json.dumps(to_disk_config(config), indent=2, sort_keys=True) + "\n")


# --- weights ---------------------------------------------------------------------------------------


def weight_files(directory: str | Path, variant: str | None) -> list[Path]:
    """The safetensors files of a saved model (variant as in `save_pretrained`)."""
    directory = Path(directory)
    single, index = "model.safetensors", "model.safetensors.index.json"
    if variant:
        single, index = f"model.{variant}.safetensors", f"model.safetensors.index.{variant}.json"
    if (directory / index).is_file():
        names = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return [directory / single]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own warnings off for a block: the stock loader prints a load report of the keys we
    expect to differ, and `rebuild` reports what it finds itself."""
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


def rebuild(model: PreTrainedModel, info: dict, files: list[Path], where: str) -> PreTrainedModel:
    """Re-apply the conversion recorded in `model.config` to a stock-loaded skeleton and load the EAS
    tensors strictly. The stock loader silently re-initialises what it does not find, so the keys it
    reports missing must be exactly the removed ones and the unexpected keys exactly the EAS tensors."""
    stored = stored_conversion(model.config)
    if stored is None:
        raise ArtefactError(f"{where}: not an EAS-converted model (no text_config.eas)")
    plan, adapters, merged = stored
    text = model.config.get_text_config(decoder=True)
    delattr(text, "eas")  # apply_plan records it again
    stock_keys = set(model.state_dict())
    # The plan's fingerprint names the *source* model; this skeleton holds the converted weights.
    apply_plan(model, plan, adapters, merged=merged, check_fingerprint=False)
    converted_keys = set(model.state_dict())
    expected_missing, expected_unexpected = stock_keys - converted_keys, converted_keys - stock_keys
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    if missing != expected_missing or unexpected != expected_unexpected or info.get("mismatched_keys"):
        problems = []
        if lost := sorted(missing - expected_missing):
            problems.append(f"tensors missing from the checkpoint: {lost[:5]}")
        if extra := sorted(unexpected - expected_unexpected):
            problems.append(f"unknown tensors in the checkpoint: {extra[:5]}")
        if absent := sorted(expected_unexpected - unexpected):
            problems.append(f"EAS tensors missing from the checkpoint: {absent[:5]}")
        if stale := sorted(expected_missing - missing):
            problems.append(f"tensors that the plan removes are present: {stale[:5]}")
        if info.get("mismatched_keys"):
            problems.append(f"tensors with the wrong shape: {list(info['mismatched_keys'])[:5]}")
        raise ArtefactError(f"{where}: checkpoint does not match its EAS plan; " + "; ".join(problems))
    _load_eas_tensors(model, files, sorted(expected_unexpected), where)
    return model.eval()


def _load_eas_tensors(model: PreTrainedModel, files: list[Path], keys: list[str], where: str) -> None:
    """Copy the EAS tensors (named in memory) from the checkpoint (named in the on-disk layout)."""
    state = model.state_dict()
    decoder = locate_decoder(model)
    mem_prefix = decoder.path + ".layers."
    on_disk: dict[str, Path] = {}
    for file in files:
        with safe_open(file, "pt") as fh:
            on_disk.update(dict.fromkeys(fh.keys(), file))
    # The decoder's layers may sit under another prefix on disk (LLaVA's legacy layout): find it from
    # one layer key that both layouts share.
    probe = next(f"{i}.mlp.down_proj.weight" for i in range(len(decoder.layers)))
    matches = [k for k in on_disk if k.endswith(".layers." + probe) or k == "layers." + probe]
    if len(matches) > 1:  # another module's layers have an mlp too (Idefics2's perceiver): the decoder's name decides
        own = [k for k in matches if k.endswith(f"{decoder.path.rsplit('.', 1)[-1]}.layers.{probe}")]
        matches = own if len(own) == 1 else matches
    if len(matches) != 1:
        raise ArtefactError(f"{where}: cannot locate the decoder layers in the checkpoint")
    disk_prefix = matches[0][: -len(probe)]
    with torch.no_grad():
        for key in keys:
            if not key.startswith(mem_prefix):
                raise ArtefactError(f"{where}: unexpected EAS tensor outside the decoder layers: {key}")
            disk_key = disk_prefix + key[len(mem_prefix):]
            if disk_key not in on_disk:
                raise ArtefactError(f"{where}: tensor {disk_key} is missing")
            with safe_open(on_disk[disk_key], "pt") as fh:
                tensor = fh.get_tensor(disk_key)
            target = state[key]
            if tensor.shape != target.shape:
                raise ArtefactError(f"{where}: tensor {disk_key} has shape {tuple(tensor.shape)}, "
                                    f"expected {tuple(target.shape)}")
            target.copy_(tensor.to(target.dtype))


# --- save_pretrained on a converted model -----------------------------------------------------------


def _eas_save_pretrained(self: PreTrainedModel, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """`save_pretrained` of a converted model: always format 2 (see the module docstring)."""
    if stored_conversion(self.config) is None:
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("variant") not in (None, WEIGHTS_VARIANT):
        raise ValueError(f"a converted model is saved under the {WEIGHTS_VARIANT!r} weights variant")
    kwargs["variant"] = WEIGHTS_VARIANT
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    rewrite_saved_config(save_directory)
    write_remote_code(save_directory)
    return result


def write_remote_code(directory: str | Path) -> None:
    from eas.model.remote import remote_source  # not in the bundle: there the running source is copied

    (Path(directory) / REMOTE_FILE).write_text(remote_source())


def install_save(model: PreTrainedModel) -> None:
    model.save_pretrained = types.MethodType(_eas_save_pretrained, model)


# --- the classes auto_map names -----------------------------------------------------------------------


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")
_DROPPED_KWARGS = ("trust_remote_code", "code_revision", "adapter_kwargs", "_from_auto", "_commit_hash",
                   "return_unused_kwargs")


def _local_dir(path: str | os.PathLike, kwargs: dict[str, Any]) -> Path:
    if kwargs.get("subfolder"):
        raise ValueError("a converted EAS model cannot be loaded from a subfolder")
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    hub = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "revision", "token") if k in kwargs}
    return Path(snapshot_download(repo_id=str(path), **hub))


class EASConfig(PretrainedConfig):
    """What `AutoConfig` runs for a format-2 directory: it returns the *stock* config (with the plan under
    `text_config.eas` and this `auto_map`), so that the stock class builds the skeleton."""

    model_type = MODEL_TYPE

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        for name in _DROPPED_KWARGS[:-1]:
            kwargs.pop(name, None)
        config_dict, kwargs = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **kwargs)
        stock = from_disk_config(config_dict)
        stock["auto_map"] = config_dict.get("auto_map")
        return stock_config(stock, **kwargs)


class EASModel(PreTrainedModel):
    """What the Auto model classes run for a format-2 directory: the stock class's `from_pretrained`
    (weights variant "eas", fp32), then `rebuild`. Returns an instance of the stock class, converted.

    Supported keywords: `dtype`/`torch_dtype` (a torch dtype or its name; "auto" keeps fp32),
    `device_map` as one device ("cpu", "cuda:0"), `output_loading_info`, the hub keywords; anything
    else goes to the stock `from_pretrained`."""

    config_class = EASConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: Any = None, **kwargs: Any) -> Any:
        return load_pretrained(pretrained_model_name_or_path, config=config, **kwargs)


def load_pretrained(path: str | os.PathLike, config: Any = None, **kwargs: Any) -> Any:
    """Load a format-2 directory (local, or a hub repository id) into the exact converted model."""
    directory = _local_dir(path, kwargs)
    for name in (*_HUB_KWARGS, *_DROPPED_KWARGS, "subfolder"):
        kwargs.pop(name, None)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    device = kwargs.pop("device_map", None)
    want_info = kwargs.pop("output_loading_info", False)
    if device is not None and not isinstance(device, str | torch.device):
        raise ValueError("a converted EAS model loads onto one device: device_map must be a device name")
    if config is None or stored_conversion(config) is None:
        raw = json.loads((directory / CONFIG_FILE).read_text())
        config = stock_config(from_disk_config(raw) if is_eas_config(raw) else raw)
    cls = stock_class(config)
    reduction = (stored_conversion_dict(config) or {}).get("token_reduction")
    with quiet_transformers():
        model, info = cls.from_pretrained(directory, config=config, dtype=torch.float32, variant=WEIGHTS_VARIANT,
                                          output_loading_info=True, **kwargs)
    model = rebuild(model, info, weight_files(directory, WEIGHTS_VARIANT), str(path))
    if reduction is not None:  # a visual-token budget recorded beside the plan (eas.model.token_reduction)
        from eas.model.token_reduction import TokenReduction, install_reduction

        install_reduction(model, TokenReduction.model_validate(reduction))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    if want_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model
