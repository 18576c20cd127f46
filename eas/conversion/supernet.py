"""The weight-sharing supernet of the EAS search (eas-method.md §6–§7 stage 1).

Every candidate layer gets a PIA *and* keeps its attention; every layer gets a kept-layer adapter on its
`input_layernorm`. A `SwitchableLayer` runs either form, chosen per training step by the bandit: skipped
layers run the core's exact `SkippedLayer` form (y = x + FFN(g_f ⊙ PIA(x̂))), kept layers run the stock
layer with Q/K/V reading Ad(x̂). Because the PIA of a skipped layer and the adapter of a kept layer are
the very modules stage 2 would train, a subset's loss measures how well *that* plan can be adapted.

The supernet is installed in place on a frozen source model and removed afterwards (`with Supernet(...)`),
restoring the original modules exactly: the search never changes a source weight, and stage 2 starts
fresh from the same model (§7: fresh training, not the search checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from eas.model.adapters import PIA, AdapterConfig, RoutedAdapter
from eas.model.arch import locate_decoder
from eas.model.layers import AdaptedNorm, SkippedLayer
from eas.model.pooling import PoolingState, install_hook


class SwitchableLayer(nn.Module):
    """One decoder layer in both forms; `skip` selects the form for the next forward pass."""

    def __init__(self, layer: nn.Module, pia: PIA, state: PoolingState, layer_idx: int) -> None:
        super().__init__()
        # Built from the raw layer before its input norm is wrapped, so the skipped form normalises with
        # the plain input_layernorm (a skipped layer has no kept-layer adapter).
        self.skipped = SkippedLayer(layer, pia, state, layer_idx)
        self.kept = layer
        self.skip = False
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return (self.skipped if self.skip else self.kept)(hidden_states, *args, **kwargs)


class Supernet:
    """Installs the supernet on `model` (in place); `remove()` (or leaving the `with` block) undoes it."""

    def __init__(self, model: PreTrainedModel, candidates: Iterable[int], adapters: AdapterConfig) -> None:
        if getattr(model, "_eas_runtime", None) is not None:
            raise ValueError("the supernet needs an unconverted source model")
        self.model = model
        self.decoder = locate_decoder(model)
        self.candidates = tuple(sorted(set(candidates)))
        hidden = self.decoder.text_config.hidden_size
        adapters.check_hidden(hidden)
        device = next(model.parameters()).device
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._originals: dict[int, nn.Module] = {}
        self._norms: dict[int, nn.Module] = {}
        self.switches: dict[int, SwitchableLayer] = {}
        self.state = PoolingState()

        self._hook = None
        try:
            self._install(hidden, adapters, device)
        except BaseException:
            self.remove()  # never leave a half-built supernet behind
            raise

    def _install(self, hidden: int, adapters: AdapterConfig, device: torch.device) -> None:
        model = self.model
        for param in model.parameters():
            param.requires_grad_(False)
        trainable: list[nn.Module] = []
        for i, layer in enumerate(self.decoder.layers):
            self._originals[i] = layer
            if i in self.candidates:
                pia = PIA(hidden, adapters).to(device)
                switch = SwitchableLayer(layer, pia, self.state, i)
                trainable.append(pia)
            if adapters.kept_adapters:
                self._norms[i] = layer.input_layernorm
                adapter = RoutedAdapter(hidden, adapters).to(device)
                layer.input_layernorm = AdaptedNorm(layer.input_layernorm, adapter, self.state, f"kept{i}")
                trainable.append(adapter)
            if i in self.candidates:
                self.decoder.layers[i] = switch
                self.switches[i] = switch
        for module in trainable:
            module.requires_grad_(True)
        self._hook = install_hook(model, self.state)

    def set_skipped(self, subset: Sequence[int]) -> None:
        """Skip exactly the layers in `subset` (all candidates) on the following forward passes."""
        chosen = set(subset)
        unknown = chosen - set(self.candidates)
        if unknown:
            raise ValueError(f"layers {sorted(unknown)} are not search candidates")
        for i, switch in self.switches.items():
            switch.skip = i in chosen

    def remove(self) -> None:
        """Restore the source model's modules and flags exactly."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for i, original in self._originals.items():
            self.decoder.layers[i] = original
            if i in self._norms:
                original.input_layernorm = self._norms[i]
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, False))
            param.grad = None
        self._originals.clear()
        self._norms.clear()

    def __enter__(self) -> Supernet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
