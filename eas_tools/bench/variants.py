"""The two models a benchmark compares, written to disk the way a real conversion writes them.

For a geometry (random weights): the baseline is saved as a plain HF directory; the EAS variant is the
same weights converted with a skip plan (`apply_plan`), its adapters given small random up-projections (so
the fold is not the identity), folded (`fold_model`) and saved with `save_converted` — the exact artefact
`eas convert` publishes. Both are then loaded back by the service and the benchmark through
`eas.model.loading.load_model`, the one loader everything uses.

Real models come as two directories or a store version (the converted version and its parent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from eas.manifest import write_manifest
from eas.model.adapters import AdapterConfig
from eas.model.convert import apply_plan
from eas.model.fold import fold_model
from eas.model.loading import resolve_device, resolve_dtype
from eas.model.persistence import save_converted
from eas.model.plan import SkipPlan
from eas.zoo.llava import GEOMETRIES, LlavaGeometry, build_llava_config, build_llava_processor
from eas.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID

# Geometries too large for a CPU: building one there would exhaust memory (28 GB of fp32 weights) or take
# hours per request, so they are built only on a GPU unless the caller insists.
GPU_ONLY: frozenset[str] = frozenset({"llava-1.5-7b"})


class BenchSetupError(ValueError):
    """The benchmark cannot be set up as asked (message says why and what to do)."""


@dataclass(frozen=True)
class VariantDirs:
    baseline: Path
    eas: Path
    source: str  # "geometry:<name>", "dirs" or "store:<model>:<version>"


def geometry_named(name: str) -> LlavaGeometry:
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise BenchSetupError(f"unknown geometry {name!r}; choose one of {', '.join(GEOMETRIES)}") from None


def check_device_for(geometry: str, device: torch.device, allow_cpu: bool = False) -> None:
    if geometry in GPU_ONLY and device.type != "cuda" and not allow_cpu:
        raise BenchSetupError(
            f"geometry {geometry} has ~7 B parameters (28 GB in fp32) and is built on a GPU only; run with "
            "--device cuda on a machine with one, or pass --allow-large-on-cpu if you really mean it")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random(geometry: LlavaGeometry, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "fp32") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A seeded random LLaVA built directly on `device` in `dtype` (a 7 B model never exists in fp32),
    whose greedy decoding never stops early: the LM head's end-of-sequence row is zeroed, so that logit is
    exactly 0 while the maximum of the other random logits is positive (all of them negative has probability
    2^-(V-1)). Every request then decodes exactly max_new_tokens, in both variants alike."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = build_llava_config(geometry)
    torch.manual_seed(seed)
    with torch.device(dev), _default_dtype(dt):
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    with torch.no_grad():
        model.lm_head.weight[EOS_ID].zero_()
    return model, build_llava_processor(geometry)


def save_plain(model: LlavaForConditionalGeneration, processor: LlavaProcessor, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    write_manifest(directory)
    return directory


def convert_and_save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, plan: SkipPlan,
                     directory: Path, seed: int = 0, adapters: AdapterConfig | None = None) -> Path:
    """Convert `model` in place (adapter form), give the adapters small random up-projections, fold, save."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    apply_plan(model, plan, adapters or AdapterConfig())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            # Up-projections start at zero (identity adapters); 0.02-scale values make W' = W diag(g) M ≠ W.
            if (".pia." in name or ".adapter." in name) and ".B." in name:
                tensor.copy_(0.02 * torch.randn(tensor.shape, generator=generator, dtype=torch.float32))
    model.to(device=device, dtype=dtype)  # the adapters were created on the CPU in fp32
    fold_model(model)
    return save_converted(model, directory, processor)


def build_geometry_pair(name: str, plan: SkipPlan, workdir: Path, *, seed: int = 0, device: str = "auto",
                        dtype: str = "auto", allow_cpu: bool = False) -> VariantDirs:
    """Baseline and EAS directories under `workdir` for a named geometry."""
    geometry = geometry_named(name)
    dev = resolve_device(device)
    check_device_for(name, dev, allow_cpu)
    model, processor = build_random(geometry, seed, dev, dtype)
    baseline = save_plain(model, processor, workdir / "baseline")
    eas = convert_and_save(model, processor, plan, workdir / f"eas-skip{len(plan.skipped)}", seed)
    del model
    return VariantDirs(baseline=baseline, eas=eas, source=f"geometry:{name}")


def build_geometry_eas(name: str, plan: SkipPlan, workdir: Path, *, seed: int = 0, device: str = "auto",
                       dtype: str = "auto") -> Path:
    """One more EAS directory from the same seeded weights (the skip-fraction sweep)."""
    model, processor = build_random(geometry_named(name), seed, device, dtype)
    return convert_and_save(model, processor, plan, workdir / f"eas-skip{len(plan.skipped)}", seed)


def store_pair(store_root: Path, model: str, version: str | None = None) -> VariantDirs:
    """A converted store version (default: the active one) and its unskipped parent, as the service would
    serve them (`model_store.serving.served_versions`). Their checksums are verified when they are loaded."""
    from model_store import ModelStore, StoreError, served_versions

    try:
        served = served_versions(ModelStore(store_root), model, version)
    except StoreError as exc:
        raise BenchSetupError(f"model store {store_root}: {exc}") from exc
    info = served[0].info
    if served[0].variant != "eas":
        raise BenchSetupError(f"{model}:{info.version} is a {info.kind} version; benchmark a converted version "
                              "(it is compared with its unskipped parent)")
    if len(served) < 2:
        raise BenchSetupError(f"{model}:{info.version} has no unskipped parent in the store")
    return VariantDirs(baseline=served[1].info.path, eas=info.path, source=f"store:{model}:{info.version}")
