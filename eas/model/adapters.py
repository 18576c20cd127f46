"""The two EAS adapters (eas-method.md §3, §4), written in the reference's notation.

- `PIA` stands in for a removed attention: PIA(x̂_t) = x̂_t + s·Σ_i w_i (B_i z_t + b_Bi), with
  z_t = ½ (p + C x̂_t + b_C) and p = A m + b_A from the pooled prompt input m.
- `RoutedAdapter` sits between `input_layernorm` and `self_attn` of kept layers:
  Ad(x̂_t) = x̂_t + s·Σ_i w_i (B_i a_t + b_Bi), a_t = A x̂_t + b_A.

With `router=True` the weights w = softmax((E m + b_E)/τ) mix two up-projections (B and D), as in the
released code; with `router=False` (the project default) there is a single up-projection and w = (1),
which is what makes a static fold possible (eas-method.md §10 B).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class AdapterConfig(BaseModel):
    """Hyper-parameters of every adapter in a converted model; persisted in its config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pia_rank: int = Field(32, gt=0)
    kept_rank: int = Field(8, gt=0)
    groups: int = Field(2, gt=0)
    scale: float = 1.0
    temperature: float = Field(10.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    router: bool = False
    kept_adapters: bool = True
    up_init: Literal["zero", "xavier"] = "zero"

    @model_validator(mode="after")
    def _divisible(self) -> AdapterConfig:
        for name in ("pia_rank", "kept_rank"):
            if getattr(self, name) % self.groups:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by groups={self.groups}")
        return self

    def check_hidden(self, hidden: int) -> None:
        if hidden % self.groups:
            raise ValueError(f"hidden size {hidden} is not divisible by groups={self.groups}")


class GroupedUp(nn.Module):
    """A block-diagonal r→d projection with G groups (a grouped 1×1 conv): output chunk g is
    B_g z_g + b[g], where z_g and the output are split into G contiguous chunks."""

    def __init__(self, rank: int, hidden: int, groups: int, init: str = "zero") -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(groups, hidden // groups, rank // groups))
        self.bias = nn.Parameter(torch.zeros(hidden))
        if init == "xavier":
            for block in self.weight.data:
                nn.init.xavier_uniform_(block)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        chunks = z.unflatten(-1, (self.groups, -1))
        out = torch.einsum("...gi,goi->...go", chunks, self.weight)
        return out.flatten(-2) + self.bias

    def dense(self) -> torch.Tensor:
        """The full d×r block-diagonal matrix, for folding."""
        return torch.block_diag(*self.weight)


def _xavier_linear(inp: int, out: int) -> nn.Linear:
    layer = nn.Linear(inp, out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _Mixture(nn.Module):
    """The routed pair of up-projections shared by both adapters: s·Σ_i w_i (B_i z + b_Bi)."""

    def __init__(self, rank: int, hidden: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.scale = cfg.scale
        self.temperature = cfg.temperature
        self.B = GroupedUp(rank, hidden, cfg.groups, cfg.up_init)
        if cfg.router:
            self.D = GroupedUp(rank, hidden, cfg.groups, cfg.up_init)
            self.E = nn.Linear(hidden, 2)
        else:
            self.D = None
            self.E = None

    @property
    def routed(self) -> bool:
        return self.E is not None

    def route(self, m: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights w [B, 2] from the pooled input m [B, d]; None without a router."""
        if self.E is None:
            return None
        return torch.softmax(self.E(m) / self.temperature, dim=-1)

    def up(self, z: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            return self.scale * self.B(z)
        w1 = w[:, 0, None, None]
        w2 = w[:, 1, None, None]
        return self.scale * (w1 * self.B(z) + w2 * self.D(z))


class PIA(nn.Module):
    """Parallel attention adapter for a skipped layer (§3). Stats (p, w) are computed once per
    sample from the pooled prompt input m by `prefill`, then reused for every token."""

    def __init__(self, hidden: int, cfg: AdapterConfig) -> None:
        super().__init__()
        cfg.check_hidden(hidden)
        r = cfg.pia_rank
        self.A = _xavier_linear(hidden, r)
        self.C = _xavier_linear(hidden, r)
        self.mix = _Mixture(r, hidden, cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def prefill(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(p [B, r], w [B, 2] or None) from the pooled normalised prompt input m [B, d]."""
        return self.A(m), self.mix.route(m)

    def forward(self, x_hat: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        p, w = stats
        z = 0.5 * (p[:, None, :] + self.C(x_hat))
        return x_hat + self.mix.up(self.dropout(z), w)


class RoutedAdapter(nn.Module):
    """The kept-layer adapter (§4): acts on x̂ before Q/K/V; the residual keeps the raw x."""

    def __init__(self, hidden: int, cfg: AdapterConfig) -> None:
        super().__init__()
        cfg.check_hidden(hidden)
        self.A = _xavier_linear(hidden, cfg.kept_rank)
        self.mix = _Mixture(cfg.kept_rank, hidden, cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def routed(self) -> bool:
        return self.mix.routed

    def prefill(self, m: torch.Tensor) -> torch.Tensor | None:
        return self.mix.route(m)

    def forward(self, x_hat: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return x_hat + self.mix.up(self.dropout(self.A(x_hat)), w)

