"""Exactness of the fold math on single layers, fp64 and fp32, with the public code's bias bug as
the negative control (eas-method.md §8, §9, §13 tests 1, 3, 4)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from eas.model.adapters import PIA, AdapterConfig, RoutedAdapter
from eas.model.fold import _fold_kept_layer, _fold_skipped_layer, fold_kept, fold_skipped
from eas.model.layers import AdaptedNorm, SkippedLayer
from eas.model.pooling import PoolingState
from tests.core.helpers import perturb

D, FFN, R, N, B = 64, 172, 16, 11, 3
CFG = AdapterConfig(pia_rank=R, kept_rank=8, up_init="xavier", dropout=0.0, scale=0.7)


def _layer(dtype: torch.dtype) -> LlamaDecoderLayer:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=2)
    layer = LlamaDecoderLayer(config, layer_idx=1).to(dtype)
    perturb(layer, seed=3)
    return layer


def _skipped(dtype: torch.dtype) -> tuple[SkippedLayer, torch.Tensor]:
    layer = _layer(dtype)
    torch.manual_seed(1)
    pia = PIA(D, CFG).to(dtype)
    perturb(pia, seed=4, all_biases=True)
    assert pia.A.bias.abs().min() > 0 and pia.mix.B.bias.abs().min() > 0
    skipped = SkippedLayer(layer, pia, PoolingState(), 1).eval()
    x = 2.0 * torch.randn(B, N, D, dtype=dtype)
    return skipped, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _wrong_bias_output(skipped: SkippedLayer, x: torch.Tensor) -> torch.Tensor:
    """The released merge code: bias computed from the UPDATED weight, b = W' (g_f ⊙ c)."""
    mlp, pia = skipped.mlp, skipped.pia
    x_hat = skipped.input_layernorm(x)
    m = x_hat.mean(dim=1)
    p = pia.A(m)
    g_f = skipped.post_attention_layernorm.weight
    U = pia.mix.scale * pia.mix.B.dense()
    u = pia.mix.scale * pia.mix.B.bias
    M = torch.eye(D, dtype=x.dtype) + 0.5 * U @ pia.C.weight
    c = 0.5 * (p + pia.C.bias) @ U.T + u  # [B, d]
    outs = []
    for W in (mlp.gate_proj.weight, mlp.up_proj.weight):
        W_new = (W * g_f) @ M
        outs.append(x_hat @ W_new.T + ((g_f * c) @ W_new.T)[:, None, :])
    return x + mlp.down_proj(mlp.act_fn(outs[0]) * outs[1])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_skipped_layer_fold_is_exact(dtype: torch.dtype, tol: float) -> None:
    skipped, x = _skipped(dtype)
    with torch.no_grad():
        reference = skipped(x)
        merged = _fold_skipped_layer(skipped, R)
        folded = merged(x)
    err = (folded - reference).abs().max().item() if dtype == torch.float64 else _rel(folded, reference)
    assert err < tol
    assert reference.abs().max() > 1.0  # the comparison is on outputs of real magnitude


def test_wrong_bias_formula_fails_the_same_test() -> None:
    skipped, x = _skipped(torch.float64)
    with torch.no_grad():
        reference = skipped(x)
        wrong = _wrong_bias_output(skipped, x)
        assert (wrong - reference).abs().max().item() > 1e-3 * reference.abs().max().item()


def test_fold_skipped_math_matches_definition() -> None:
    """W' x̂ + V p + κ equals W diag(g_f) (M x̂ + c) for random fp64 tensors."""
    gen = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    W_g, W_u, g_f, U, u, C, b_C, x, p = r(FFN, D), r(FFN, D), r(D), r(D, R), r(D), r(R, D), r(R), r(D), r(R)
    fold = fold_skipped(W_g, W_u, g_f, U, u, C, b_C)
    pia = x + 0.5 * U @ (p + C @ x + b_C) + u
    expected = W_g @ (g_f * pia)
    got = fold.gate_weight @ x + fold.V_gate @ p + fold.kappa_gate
    assert (got - expected).abs().max() < 1e-10


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_kept_layer_qkv_fold_is_exact(with_bias: bool, dtype: torch.dtype, tol: float) -> None:
    layer = _layer(dtype)
    if with_bias:  # Qwen2-style q/k/v bias
        from eas.model.convert import add_qkv_bias

        add_qkv_bias(layer.self_attn)
        perturb(layer.self_attn, seed=9, all_biases=True)
    torch.manual_seed(2)
    adapter = RoutedAdapter(D, CFG).to(dtype)
    perturb(adapter, seed=6, all_biases=True)
    assert adapter.A.bias.abs().min() > 0 and adapter.mix.B.bias.abs().min() > 0
    layer.input_layernorm = AdaptedNorm(layer.input_layernorm, adapter, PoolingState(), "kept1")
    x = 2.0 * torch.randn(B, N, D, dtype=dtype)
    with torch.no_grad():
        projections = ("q_proj", "k_proj", "v_proj")
        reference = {n: getattr(layer.self_attn, n)(layer.input_layernorm(x)) for n in projections}
        b_q = layer.self_attn.q_proj.bias
        b_q = None if b_q is None else b_q.clone()
        U_f = CFG.scale * adapter.mix.B.dense()
        c_f = U_f @ adapter.A.bias + CFG.scale * adapter.mix.B.bias
        _fold_kept_layer(layer)
        for name in projections:
            folded = getattr(layer.self_attn, name)(layer.input_layernorm(x))
            err = (folded - reference[name]).abs().max().item()
            assert (err if dtype == torch.float64 else err / reference[name].abs().max().item()) < tol
        # Negative control: the released code's bias W' c_f (+ b) must fail the same test.
        wrong_bias = layer.self_attn.q_proj.weight @ c_f + (0 if b_q is None else b_q)
        wrong = layer.input_layernorm(x) @ layer.self_attn.q_proj.weight.T + wrong_bias
        assert (wrong - reference["q_proj"]).abs().max() > 1e-3 * reference["q_proj"].abs().max()
    assert not isinstance(layer.input_layernorm, AdaptedNorm)


def test_router_identity_mixes_two_static_folds() -> None:
    """W'(w) = w_1 W^(1) + w_2 W^(2) (eas-method.md §10 A, test 6)."""
    gen = torch.Generator().manual_seed(8)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    W, g_f, B1, B2, C, b_C = r(FFN, D), r(D), r(D, R), r(D, R), r(R, D), r(R)
    zero = torch.zeros(D, dtype=torch.float64)
    w = torch.softmax(r(2), dim=0)
    mixed = fold_skipped(W, W, g_f, w[0] * B1 + w[1] * B2, zero, C, b_C).gate_weight
    one = fold_skipped(W, W, g_f, B1, zero, C, b_C).gate_weight
    two = fold_skipped(W, W, g_f, B2, zero, C, b_C).gate_weight
    assert (mixed - (w[0] * one + w[1] * two)).abs().max() < 1e-12


def test_fold_kept_adds_existing_bias() -> None:
    gen = torch.Generator().manual_seed(9)
    W, b = torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    zeros_U, zeros_u = torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    A, b_A = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    W_new, b_new = fold_kept(W, b, zeros_U, zeros_u, A, b_A)
    assert torch.equal(W_new, W) and torch.equal(b_new, b)  # a zero adapter folds to the identity
