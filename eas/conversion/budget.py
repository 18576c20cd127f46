"""How many attention sub-layers to skip: by count, by fraction, or by a target latency speedup.

The target-speedup budget needs to know what an attention sub-layer costs *on the device that will run
the model*, so `measure_cost` times a representative batch-1 generation (the prompt of a real sample,
a fixed number of new tokens) end to end, and — with hooks — the time spent inside every layer's
`self_attn` and `mlp`. Skipping k layers removes k attention sub-layers (their KV-cache writes
included; the PIA that replaces one folds into the FFN at no cost, eas-method.md §8), so

    predicted speedup(k) = T_total / (T_total − k · t_attn)

with t_attn the mean per-layer attention time. The smallest k whose prediction reaches the target is
chosen. Every decoder layer of the supported families has the same shape, so the prediction does not
depend on *which* layers are skipped and the budget can be fixed before a criterion runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel, ProcessorMixin

from eas.conversion.data import VQASample, load_images
from eas.model.arch import locate_decoder
from eas.model.generation import generate
from eas.model.loading import LoadedModel
from eas.model.token_reduction import TokenReduction, install_reduction, remove_reduction


class Budget(BaseModel):
    """Exactly one of: a skip count, a fraction of all MHA sub-layers, or a target speedup (> 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: int | None = Field(None, gt=0)
    fraction: float | None = Field(None, gt=0, lt=1)
    target_speedup: float | None = Field(None, gt=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        given = [n for n in ("count", "fraction", "target_speedup") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one budget: a skip count, a skip fraction or a target speedup")
        return self

    def describe(self) -> str:
        if self.count is not None:
            return f"skip {self.count} layers"
        if self.fraction is not None:
            return f"skip {self.fraction:.0%} of the attention layers"
        return f"target speedup {self.target_speedup:g}x"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class CostModel:
    """Measured costs of one representative batch-1 generation (seconds)."""

    device: str
    num_layers: int
    prompt_tokens: int
    new_tokens: int
    total_s: float
    attention_s: float  # mean over layers of the time inside one layer's self_attn
    ffn_s: float  # same for the mlp

    def predicted_speedup(self, k: int) -> float:
        remaining = self.total_s - k * self.attention_s
        return self.total_s / max(remaining, 1e-12)

    @property
    def attention_share(self) -> float:
        """Share of the whole generation spent in attention sub-layers."""
        return self.num_layers * self.attention_s / self.total_s

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure_cost(model: PreTrainedModel, processor: ProcessorMixin, sample: VQASample, *,
                 new_tokens: int = 4, repeats: int = 5) -> CostModel:
    """Median end-to-end time of `repeats` batch-1 generations, then the same run with timing hooks on
    every self_attn and mlp (hook overhead is kept out of the total)."""
    param = next(model.parameters())
    device = param.device
    loaded = LoadedModel(model=model, processor=processor, device=device, dtype=param.dtype)
    batch = loaded.prepare(load_images([sample]), [sample.question])
    model.eval()

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        generate(model, batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        _sync(device)
        return time.perf_counter() - start

    run()  # warm-up: allocator, kernels, lazy init
    total = statistics.median(run() for _ in range(repeats))

    layers = locate_decoder(model).layers
    spent = {"attn": [0.0] * len(layers), "ffn": [0.0] * len(layers)}
    starts: dict[tuple[str, int], float] = {}
    handles = []

    def timer(kind: str, i: int):
        def pre(*_):
            _sync(device)
            starts[(kind, i)] = time.perf_counter()

        def post(*_):
            _sync(device)
            spent[kind][i] += time.perf_counter() - starts.pop((kind, i))
        return pre, post

    for i, layer in enumerate(layers):
        for kind, module in (("attn", getattr(layer, "self_attn", None)), ("ffn", layer.mlp)):
            if module is None:
                continue
            pre, post = timer(kind, i)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    shares: dict[str, list[float]] = {"attn": [], "ffn": []}
    try:
        for _ in range(repeats):
            for kind in spent:
                spent[kind] = [0.0] * len(layers)
            wall = run()
            for kind in spent:
                shares[kind].append(sum(spent[kind]) / wall)
    finally:
        for handle in handles:
            handle.remove()
    # Shares of the same hooked run, medians over runs: robust to a stall of the (shared) machine, and
    # the hooks' own overhead cancels out of the ratio. Applied to the un-hooked median total.
    attn_layers = sum(1 for module in layers if getattr(module, "self_attn", None) is not None) or 1
    return CostModel(
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        num_layers=len(layers),
        prompt_tokens=int(batch["input_ids"].shape[1]),
        new_tokens=new_tokens,
        total_s=total,
        attention_s=statistics.median(shares["attn"]) * total / attn_layers,
        ffn_s=statistics.median(shares["ffn"]) * total / len(layers),
    )


@dataclass(frozen=True)
class BudgetDecision:
    k: int
    fraction: float
    predicted_speedup: float | None
    basis: str
    token_keep: float | None = None  # fraction of image tokens kept (issue 19); None: no token reduction

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_budget(budget: Budget, num_layers: int, num_candidates: int, cost: CostModel | None) -> BudgetDecision:
    """The skip count a budget asks for, checked against the candidates, with the predicted speedup."""

    def decided(k: int, basis: str) -> BudgetDecision:
        if k > num_candidates:
            raise ValueError(
                f"{budget.describe()} means skipping {k} layers, but only {num_candidates} of the {num_layers} "
                "layers are candidates (layer 0 is excluded unless include_layer0 is set)"
            )
        predicted = cost.predicted_speedup(k) if cost is not None else None
        return BudgetDecision(k=k, fraction=k / num_layers, predicted_speedup=predicted, basis=basis)

    if budget.count is not None:
        return decided(budget.count, "count")
    if budget.fraction is not None:
        return decided(max(1, int(budget.fraction * num_layers + 0.5)), "fraction")  # half rounds up
    if cost is None:
        raise ValueError("a target-speedup budget needs a measured cost model")
    for k in range(1, num_candidates + 1):
        if cost.predicted_speedup(k) >= budget.target_speedup:
            return decided(k, "target_speedup")
    best = cost.predicted_speedup(num_candidates)
    raise ValueError(
        f"target speedup {budget.target_speedup:g}x is out of reach on {cost.device}: skipping all "
        f"{num_candidates} candidate layers predicts {best:.2f}x (attention is {cost.attention_share:.0%} of "
        "a generation there)"
    )


# --- visual-token reduction composed with skipping (issue 19, docs/conversion.md "One budget") -------------

# Token budgets the joint planner considers (fractions of each image's tokens).
KEEP_GRID = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)


@dataclass(frozen=True)
class TokenCostModel:
    """The cost model measured twice on the same sample: with every image token and with `probe_keep` of
    them kept. Each time (the whole generation, one layer's attention) is taken as linear in the prompt
    length through those two points; on the supported decoders both prefill and the KV reads of decoding
    grow with it, and the fixed costs (vision tower, lm head, Python) are the line's intercept.

        predicted speedup(k, keep) = T(N) / (T(n) − k · t_attn(n)),  n = N − image_tokens · (1 − keep)
    """

    full: CostModel
    reduced: CostModel
    image_tokens: int  # per prompt (one image)
    probe_keep: float

    def prompt_tokens(self, keep: float) -> float:
        return self.full.prompt_tokens - self.image_tokens * (1.0 - keep)

    def _line(self, name: str, tokens: float) -> float:
        x0, y0 = float(self.full.prompt_tokens), getattr(self.full, name)
        x1, y1 = self.prompt_tokens(self.probe_keep), getattr(self.reduced, name)
        if x0 == x1:
            return y0
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def predicted_speedup(self, k: int, keep: float = 1.0) -> float:
        tokens = self.prompt_tokens(keep)
        remaining = self._line("total_s", tokens) - k * self._line("attention_s", tokens)
        return self.full.total_s / max(remaining, 1e-12)

    def to_dict(self) -> dict:
        return {"full": self.full.to_dict(), "reduced": self.reduced.to_dict(), "image_tokens": self.image_tokens,
                "probe_keep": self.probe_keep}


def measure_token_cost(model: PreTrainedModel, processor: ProcessorMixin, sample: VQASample, *,
                       criterion: str = "cls", new_tokens: int = 4, probe_keep: float = 0.25,
                       full: CostModel | None = None, rounds: int = 3, repeats: int = 1) -> TokenCostModel:
    """`measure_cost` with every image token and with `probe_keep` of them kept (the reduction installed for
    the measurement only, then removed), **interleaved**: `rounds` rounds of one measurement each, the order
    flipping every round, medians per field. Measured one after the other, a shared machine's load drift
    lands on one side only (on the bench geometry under load, 1.68x predicted vs 2.96x measured at 25%).
    `full` (already measured) joins the all-tokens side as one more sample."""
    fulls: list[CostModel] = [] if full is None else [full]
    reduced: list[CostModel] = []
    reduction = TokenReduction(keep_fraction=probe_keep, criterion=criterion)
    image_tokens = 0
    for r in range(rounds):
        for reduce in ((False, True) if r % 2 == 0 else (True, False)):
            if not reduce:
                fulls.append(measure_cost(model, processor, sample, new_tokens=new_tokens, repeats=repeats))
                continue
            reducer = install_reduction(model, reduction, record=False)
            try:
                reduced.append(measure_cost(model, processor, sample, new_tokens=new_tokens, repeats=repeats))
                image_tokens = reducer.last_image_tokens
            finally:
                remove_reduction(model)
    return TokenCostModel(full=_median_cost(fulls), reduced=_median_cost(reduced), image_tokens=image_tokens,
                          probe_keep=probe_keep)


def _median_cost(costs: list[CostModel]) -> CostModel:
    first = costs[0]
    return CostModel(device=first.device, num_layers=first.num_layers, prompt_tokens=first.prompt_tokens,
                     new_tokens=first.new_tokens, total_s=statistics.median(c.total_s for c in costs),
                     attention_s=statistics.median(c.attention_s for c in costs),
                     ffn_s=statistics.median(c.ffn_s for c in costs))


def resolve_token_budget(budget: Budget, num_layers: int, num_candidates: int, cost: TokenCostModel,
                         keep: float | None, grid: tuple[float, ...] = KEEP_GRID) -> BudgetDecision:
    """Skip count and token budget together. `keep` given: the skip budget is resolved with the tokens kept
    at `keep`. `keep=None` (a target speedup only): every (k, keep) of `grid` whose prediction reaches the
    target is a candidate, and the one that removes least wins — the smallest skipped fraction plus dropped
    token fraction, then the higher prediction. That is the cheapest in accuracy as far as a latency model
    can tell (docs/conversion.md gives the measured accuracy of each combination on the demo model)."""
    if keep is not None:
        if budget.target_speedup is None:
            skip = resolve_budget(budget, num_layers, num_candidates, None)
            return BudgetDecision(k=skip.k, fraction=skip.fraction, basis=skip.basis, token_keep=keep,
                                  predicted_speedup=cost.predicted_speedup(skip.k, keep))
        grid = (keep,)
    if budget.target_speedup is None:
        raise ValueError("planning the token budget needs a target speedup")
    options = []
    for fraction in grid:
        for k in range(1, num_candidates + 1):
            predicted = cost.predicted_speedup(k, fraction)
            if predicted >= budget.target_speedup:
                options.append((k / num_layers + (1.0 - fraction), -predicted, k, fraction))
                break
    if not options:
        best = max(cost.predicted_speedup(num_candidates, f) for f in grid)
        raise ValueError(f"target speedup {budget.target_speedup:g}x is out of reach on {cost.full.device}: "
                         f"the best combination predicts {best:.2f}x")
    _, negative, k, fraction = min(options)
    return BudgetDecision(k=k, fraction=k / num_layers, predicted_speedup=-negative,
                          basis="target_speedup+tokens", token_keep=fraction)
