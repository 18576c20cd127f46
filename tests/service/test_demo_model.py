"""The API on the embedded, trained easy-vqa model: real images, both content types, a right answer."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from service.settings import Settings
from tests.service.conftest import TEST_DEVICE, TEST_DTYPE, running_app

pytestmark = pytest.mark.anyio

EMBEDDED = Path(__file__).resolve().parents[2] / "model_store" / "embedded" / "easy-vqa-llava"


def _colour_questions(n: int = 6) -> list[tuple[bytes, str]]:
    import easy_vqa

    questions, answers, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    picked = [(Path(paths[i]).read_bytes(), a) for q, a, i in zip(questions, answers, ids, strict=True)
              if q == "what color is the shape?"]
    return picked[:n]


async def test_demo_model_answers_colour_questions_over_both_content_types() -> None:
    settings = Settings(model_path=EMBEDDED, model="easy-vqa-llava", device=TEST_DEVICE, dtype=TEST_DTYPE,
                        api_token=None, admin_token=None)
    async with running_app(settings) as (_app, client):
        right = 0
        cases = _colour_questions()
        for png, answer in cases:
            multipart = await client.post("/v1/answer", files={"image": ("q.png", png, "image/png")},
                                          data={"question": "what color is the shape?"})
            encoded = base64.b64encode(png).decode()
            as_json = await client.post("/v1/answer", json={"image": f"data:image/png;base64,{encoded}",
                                                            "question": "what color is the shape?"})
            assert multipart.status_code == as_json.status_code == 200
            assert multipart.json()["answer"] == as_json.json()["answer"]
            right += multipart.json()["answer"] == answer
        # The model names colours right 98% of the time on the test split (docs/default-model.md).
        assert right >= len(cases) - 1


async def test_a_fresh_store_serves_the_shipped_conversion_beside_its_baseline(tmp_path: Path) -> None:
    """What `make serve` does on a fresh clone: the store seeds the embedded model and its shipped EAS
    conversion, and the service answers with `eas` by default, its skipped layers in /info, the baseline
    beside it; `/v1/models` lists the default first."""
    settings = Settings(model_store=tmp_path / "store", device=TEST_DEVICE, dtype=TEST_DTYPE, api_token=None,
                        admin_token=None)
    async with running_app(settings) as (_app, client):
        info = (await client.get("/info")).json()
        assert info["default_variant"] == "eas"
        by_name = {v["variant"]: v for v in info["variants"]}
        assert by_name["eas"]["kind"] == "converted" and by_name["eas"]["skipped_layers"]
        assert by_name["eas"]["parent"] == f"{by_name['baseline']['model']}:{by_name['baseline']['version']}"
        assert by_name["baseline"]["skipped_layers"] == []
        models = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["eas", "baseline"]
        right = 0
        cases = _colour_questions()
        for png, answer in cases:
            response = await client.post("/v1/answer", files={"image": ("q.png", png, "image/png")},
                                         data={"question": "what color is the shape?"})
            assert response.status_code == 200 and response.json()["variant"] == "eas"
            right += response.json()["answer"] == answer
        assert right >= len(cases) - 1


def test_the_shipped_conversion_was_made_from_the_shipped_baseline() -> None:
    """Its plan's source fingerprint is the shipped baseline's, so the pair served side by side is a model
    and its own conversion (a retrained baseline without a fresh conversion fails here)."""
    from eas.model.loading import load_model
    from eas.model.plan import SkipPlan, model_fingerprint

    converted = EMBEDDED.with_name(EMBEDDED.name + "-eas")
    plan = SkipPlan.from_json((converted / "plan.json").read_text())
    baseline = load_model(EMBEDDED, device=TEST_DEVICE, dtype=TEST_DTYPE)
    assert plan.fingerprint == model_fingerprint(baseline.model)
    assert plan.criterion == "eas" and len(plan.skipped) * 2 == plan.num_layers  # 50% skipped
