"""Visual-token reduction (eas/model/token_reduction.py): exactness with reduction on, on the plain and the
EAS-converted tiny LLaVA, an independent reference (masking instead of dropping), refusals, persistence."""

from __future__ import annotations

import pytest
import torch

from eas.model.generation import generate
from eas.model.token_reduction import (
    TokenReduction,
    TokenReductionError,
    install_reduction,
    merge_into_kept,
    parse_token_keep,
    remove_reduction,
    select_tokens,
    token_reducer,
)
from eas.zoo.llava import build_llava
from tests.core.helpers import converted_llava, llava_batch, select

TOL = 1e-5


def _model(converted: bool):
    if converted:
        return converted_llava()
    model, processor = build_llava(seed=0)
    return model.eval(), processor


def _scores(out) -> torch.Tensor:
    return torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "eas"])
@pytest.mark.parametrize("criterion", ["cls", "merge"])
def test_batch_alone_cache_nocache_equal(converted: bool, criterion: str) -> None:
    model, processor = _model(converted)
    batch = llava_batch(processor)
    install_reduction(model, TokenReduction(keep_fraction=0.25, criterion=criterion))
    with torch.no_grad():
        cached = generate(model, batch, max_new_tokens=4, output_scores=True, return_dict_in_generate=True)
        reducer = token_reducer(model)
        assert reducer.last_prompt_tokens == (41, 41 - 12)  # 16 image tokens per image, 4 kept
        uncached = generate(model, batch, max_new_tokens=4, use_cache=False, output_scores=True,
                            return_dict_in_generate=True)
        assert float((_scores(cached) - _scores(uncached)).abs().max()) <= TOL
        for i in range(2):
            alone = generate(model, select(batch, i), max_new_tokens=4, output_scores=True,
                             return_dict_in_generate=True)
            assert float((_scores(cached)[i] - _scores(alone)[0]).abs().max()) <= TOL
    # Negative control: the reduction changes what the model computes.
    with torch.no_grad():
        reduced = model(**batch, use_cache=False).logits[:, -1]
        remove_reduction(model)
        full = model(**batch, use_cache=False).logits[:, -1]
    assert float((reduced - full).abs().max()) > 1e-3


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "eas"])
def test_dropping_equals_masking_at_original_positions(converted: bool) -> None:
    """Independent reference: the unreduced model with the dropped image tokens masked out (attention mask 0,
    every position unchanged) computes the same last-token logits as the reduced model."""
    model, processor = _model(converted)
    batch = llava_batch(processor)
    install_reduction(model, TokenReduction(keep_count=5, criterion="cls"))
    reducer = token_reducer(model)
    with torch.no_grad():
        reduced = model(**batch, use_cache=False).logits[:, -1]
        dropped = reducer._session  # no cache: no session; read the kept rows from a cached pass instead
        assert dropped is None
        model(**batch, use_cache=True)
        dropped = reducer._session[1]
        remove_reduction(model)
        masked = dict(batch)
        masked["attention_mask"] = batch["attention_mask"] * (~dropped).long()
        length = batch["input_ids"].shape[1]
        masked["position_ids"] = torch.arange(length)[None].expand(2, -1)
        reference = model(**masked, use_cache=False).logits[:, -1]
        plain = model(**batch, use_cache=False).logits[:, -1]
    assert int(dropped.sum(dim=1)[0]) == 11
    assert float((reduced - reference).abs().max()) <= TOL
    assert float((plain - reference).abs().max()) > 1e-3  # the masking mattered


def test_kv_cache_and_keep_all_identity() -> None:
    model, processor = _model(False)
    batch = llava_batch(processor)
    with torch.no_grad():
        full = generate(model, batch, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
        install_reduction(model, TokenReduction(keep_fraction=1.0))
        same = generate(model, batch, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
        remove_reduction(model)
        install_reduction(model, TokenReduction(keep_fraction=0.25))
        small = generate(model, batch, max_new_tokens=3, output_scores=True, return_dict_in_generate=True)
    assert float((_scores(full) - _scores(same)).abs().max()) <= TOL
    # The cache holds only the kept rows: 12 image rows fewer, plus the 2 decode steps written.
    assert full.past_key_values.get_seq_length() == 41 + 2
    assert small.past_key_values.get_seq_length() == 41 - 12 + 2


def test_beam_search_expands_the_scores() -> None:
    """generate repeats each row per beam after the images were encoded (and scored): every beam of a sample
    keeps that sample's tokens, so a two-sample batch gives each sample's own beams."""
    model, processor = _model(True)
    batch = llava_batch(processor)
    install_reduction(model, TokenReduction(keep_fraction=0.25, criterion="merge"))
    with torch.no_grad():
        both = generate(model, batch, max_new_tokens=3, num_beams=2)
        alone = generate(model, select(batch, 1), max_new_tokens=3, num_beams=2)
    assert torch.equal(both[1, -3:], alone[0, -3:])


def test_selection_and_merge() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9], [0.4, 0.3, 0.2, 0.1]])
    keep = select_tokens(TokenReduction(keep_count=2), scores, 4, 2, torch.device("cpu"))
    assert keep.tolist() == [[False, True, False, True], [True, True, False, False]]  # tie -> earlier
    uniform = select_tokens(TokenReduction(keep_count=2, criterion="uniform"), None, 4, 1, torch.device("cpu"))
    assert uniform.tolist() == [[True, False, False, True]]
    features = torch.tensor([[[1.0], [2.0], [10.0], [20.0]]])
    keys = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    merged = merge_into_kept(features, keys, torch.tensor([[True, False, True, False]]))
    assert merged.flatten().tolist() == [1.5, 2.0, 15.0, 20.0]


def test_budget_parsing() -> None:
    assert parse_token_keep("25%").keep_fraction == 0.25
    assert parse_token_keep("0.125").kept(64) == 8
    assert parse_token_keep("16", "merge").keep_count == 16
    assert TokenReduction(keep_count=100).kept(64) == 64
    with pytest.raises(TokenReductionError):
        parse_token_keep("a lot")
    with pytest.raises(ValueError):
        TokenReduction()


def test_refusals() -> None:
    from eas.zoo.qwen2vl import build_qwen2vl

    with pytest.raises(TokenReductionError, match="mrope"):
        install_reduction(build_qwen2vl(), TokenReduction(keep_fraction=0.5))
    model, _ = build_llava(seed=0)
    model.config.vision_feature_layer = 0  # the projector reads the embeddings: nothing to score
    with pytest.raises(TokenReductionError, match="uniform"):
        install_reduction(model, TokenReduction(keep_fraction=0.5))
    install_reduction(model, TokenReduction(keep_fraction=0.5, criterion="uniform"))
    with pytest.raises(TokenReductionError, match="already"):
        install_reduction(model, TokenReduction(keep_fraction=0.5, criterion="uniform"))


# --- the token budget, planned with the skip count ----------------------------------------------------------


def _cost(total: float, attention: float, tokens: int):
    from eas.conversion.budget import CostModel

    return CostModel(device="cpu", num_layers=4, prompt_tokens=tokens, new_tokens=4, total_s=total,
                     attention_s=attention, ffn_s=0.0)


def test_joint_budget_picks_the_least_removal_reaching_the_target() -> None:
    from eas.conversion.budget import Budget, TokenCostModel, resolve_token_budget

    # 80 prompt tokens, 64 of them image tokens; at 25% kept (32 tokens) everything costs 40% as much.
    cost = TokenCostModel(full=_cost(1.0, 0.1, 80), reduced=_cost(0.4, 0.04, 80), image_tokens=64, probe_keep=0.25)
    assert cost.prompt_tokens(0.25) == 32
    assert cost.predicted_speedup(0, 1.0) == pytest.approx(1.0)
    assert cost.predicted_speedup(2, 0.25) == pytest.approx(1.0 / (0.4 - 2 * 0.04))
    decision = resolve_token_budget(Budget(target_speedup=2.0), 4, 3, cost, None)
    assert decision.predicted_speedup >= 2.0
    removed = decision.k / 4 + (1 - decision.token_keep)
    for keep in (1.0, 0.75, 0.5, 0.375, 0.25, 0.125):  # no combination that removes less also reaches 2x
        for k in range(1, 4):
            if k / 4 + (1 - keep) < removed:
                assert cost.predicted_speedup(k, keep) < 2.0
    fixed = resolve_token_budget(Budget(count=2), 4, 3, cost, 0.5)
    assert (fixed.k, fixed.token_keep) == (2, 0.5)
    with pytest.raises(ValueError, match="out of reach"):
        resolve_token_budget(Budget(target_speedup=50.0), 4, 3, cost, None)


# --- a conversion with the reduction in place, stored, loaded and served -------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _OneVersion:
    """The part of a store a conversion to `--out` reads (eas.conversion.export.VersionStore), over one
    directory: keeps these tests independent of the store's database."""

    def __init__(self, path) -> None:
        from types import SimpleNamespace

        self.info = SimpleNamespace(name="tiny", version="v1", ref="tiny:v1", path=path)

    def get_version(self, name: str, version: str | None = None):
        return self.info

    conversion_source = verify = get_version


@pytest.fixture(scope="module")
def reduced_conversion(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir, shapes_jsonl):
    from eas.conversion import pipeline
    from tests.conversion.conftest import fast_request

    out = tmp_path_factory.mktemp("reduced") / "out"
    request = fast_request(store=out.parent / "unused", dataset=str(shapes_jsonl), out=out, token_keep=0.25,
                           token_criterion="merge", criterion="deepest")
    return pipeline.convert(request, open_store=lambda _root: _OneVersion(tiny_model_dir)), out


def test_conversion_records_plan_and_reduction(reduced_conversion) -> None:
    from eas.model.loading import load_model
    from eas.model.token_reduction import stored_reduction

    result, out = reduced_conversion
    expected = TokenReduction(keep_fraction=0.25, criterion="merge")
    assert result.token_reduction == expected
    assert stored_reduction(out) == expected
    assert result.fold_check.relative_diff <= 1e-5  # folded + reloaded (reduction re-installed) == trained
    assert result.budget.token_keep == 0.25 and result.budget.predicted_speedup is not None
    assert result.token_cost is not None and result.token_cost.image_tokens == 16
    summary = result.summary()
    assert summary["token_reduction"]["criterion"] == "merge" and summary["prompt_tokens"][1] < summary[
        "prompt_tokens"][0]
    loaded = load_model(out, device="cpu", dtype="fp32")
    assert token_reducer(loaded.model).reduction == expected
    assert loaded.plan.skipped == result.plan.skipped


@pytest.mark.anyio
@pytest.mark.parametrize("model_process", [False, True], ids=["thread", "model-process"])
async def test_served_equals_in_process(reduced_conversion, model_process: bool) -> None:
    from eas.model.loading import load_model
    from service.settings import Settings
    from tests.service.conftest import image_bytes, multipart, running_app

    _, out = reduced_conversion
    settings = Settings(model_path=out, model="tiny-reduced", device="cpu", dtype="fp32", max_batch_wait_ms=2.0,
                        api_token=None, admin_token=None, shutdown_timeout_s=5.0, model_process=model_process)
    direct = load_model(out, device="cpu", dtype="fp32")
    import io

    from PIL import Image

    async with running_app(settings) as (_, client):
        for colour in ((200, 30, 30), (30, 30, 200)):
            png = image_bytes(colour)
            response = await client.post("/v1/answer", **multipart(png, "what colour is the circle?"))
            assert response.status_code == 200, response.text
            expected = direct.answer([Image.open(io.BytesIO(png))], ["what colour is the circle?"])[0]
            assert response.json()["answer"] == expected
        info = (await client.get("/info")).json()
        exposition = (await client.get("/metrics")).text
    served = [v for v in info["variants"] if v["token_reduction"] is not None]
    assert served and served[0]["token_reduction"]["keep_fraction"] == 0.25
    before, after = served[0]["token_reduction"]["last_prompt_tokens"]
    assert after == before - 12
    # The per-variant prompt-token metric counts what the decoder ran (the reduced prompt), not the
    # processor's prompt: two lone requests, each `after` tokens.
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s.value for family in text_string_to_metric_families(exposition) if family.name ==
               "eas_prompt_tokens" for s in family.samples if s.labels.get("variant") == served[0]["variant"]}
    assert samples["eas_prompt_tokens_count"] == 2
    assert samples["eas_prompt_tokens_sum"] == 2 * after != 2 * before


def test_request_and_cli_validate_the_token_budget(tmp_path) -> None:
    from typer.testing import CliRunner

    from eas.conversion.pipeline import ConversionRequest
    from eas_tools.cli import app

    request = ConversionRequest(store=tmp_path, model="m", skip_count=1, token_keep=16, token_criterion="merge")
    assert request.token_reduction() == TokenReduction(keep_count=16, criterion="merge")
    assert ConversionRequest(store=tmp_path, model="m", target_speedup=2.0, token_keep="auto").token_reduction(
        0.25) == TokenReduction(keep_fraction=0.25)
    with pytest.raises(ValueError, match="target"):
        ConversionRequest(store=tmp_path, model="m", skip_count=1, token_keep="auto")
    with pytest.raises(ValueError, match="whole number"):
        ConversionRequest(store=tmp_path, model="m", skip_count=1, token_keep=2.5)
    result = CliRunner().invoke(app, ["convert", "--store", str(tmp_path), "--model", "m", "--skip-count", "1",
                                      "--token-keep", "lots"])
    assert result.exit_code == 2 and "--token-keep" in result.output


def test_hf_loading_path_applies_the_reduction(reduced_conversion) -> None:
    """`from_pretrained(..., trust_remote_code=True)` of the converted directory (eas/model/artefact.py) installs
    the recorded reduction too, and computes what load_model's model computes."""
    from transformers import AutoModelForImageTextToText

    from eas.model.loading import load_model

    _, out = reduced_conversion
    loaded = load_model(out, device="cpu", dtype="fp32")
    hf = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    assert type(token_reducer(hf)).__name__ == "TokenReducer"
    assert token_reducer(hf).reduction.model_dump() == token_reducer(loaded.model).reduction.model_dump()
    batch = loaded.prepare(*_shapes(2))
    with torch.no_grad():
        a = loaded.model(**batch, use_cache=False).logits[:, -1]
        b = hf(**batch, use_cache=False).logits[:, -1]
    assert float((a - b).abs().max()) <= TOL
    assert token_reducer(hf).last_prompt_tokens[1] < token_reducer(hf).last_prompt_tokens[0]


def _shapes(n: int):
    from tests.core.helpers import images

    return images(n), ["what colour is the circle?", "what shape is in the image?"][:n]
