"""Sampling and stop options, shared by `/v1/chat/completions` and `/v1/answer` (issue 18).

Types are strict (a boolean is not a number, a number is not a string), and ranges follow OpenAI's:
temperature 0–2, top_p 0–1, at most four stop strings. Omitted, a request is decoded greedily — unlike
OpenAI, whose default temperature is 1: this server's answers stay exact and reproducible unless a client
asks for sampling. `stop_token_ids` (vLLM's name) finishes a request at any of the given token ids.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from service.batching.work import Sampling
from service.errors import ValidationFailed, describe_validation

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_TOKEN_IDS = 64

Number = StrictFloat | StrictInt  # JSON numbers either way; never a boolean or a string
StopString = Annotated[StrictStr, Field(min_length=1, max_length=256)]
# Seeds within ±(2**53 - 1): every JSON client holds those integers exactly, the OpenAPI document states the
# bounds exactly (larger ones turn into rounded floats there), and torch's generator takes them all.
SEED_BOUND = 2**53 - 1


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class SamplingFields(BaseModel):
    """Request fields that choose tokens and end the answer (besides the token limit)."""

    temperature: Annotated[Number, Field(ge=0, le=2)] | None = Field(
        None, description="0 (the default here) is greedy decoding; above 0 samples at this temperature.")
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = Field(
        None, description="Nucleus sampling: sample among the most likely tokens holding this much probability.")
    seed: Annotated[StrictInt, Field(ge=-SEED_BOUND, le=SEED_BOUND)] | None = Field(
        None, description="Makes sampling reproducible: same request, same seed, same answer.")
    # One string or a list of them; a lone string becomes a list first, so an error names `stop` itself.
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP), BeforeValidator(_listed)] | None = Field(
        None, description="Up to 4 strings (or one string); the answer ends before the first of them.")
    stop_token_ids: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = (
        Field(None, description="Token ids that end the answer (the id itself is not part of the text)."))

    def sampling(self) -> Sampling:
        return Sampling(temperature=float(self.temperature or 0.0),
                        top_p=float(self.top_p if self.top_p is not None else 1.0),
                        seed=self.seed, stop=tuple(self.stop or ()), stop_token_ids=tuple(self.stop_token_ids or ()))


class _FormSampling(BaseModel):
    """The same fields as multipart form text (numbers arrive as strings there)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=-SEED_BOUND, le=SEED_BOUND)] | None = None
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None


def sampling_from_form(fields: dict[str, Any]) -> Sampling:
    """Sampling from multipart fields (`stop` and `stop_token_ids` may repeat); 422 naming a bad one."""
    try:
        form = _FormSampling.model_validate({k: v for k, v in fields.items() if v not in (None, [])})
    except ValidationError as exc:
        message, param = describe_validation(list(exc.errors()))
        raise ValidationFailed(message, param=param) from None
    return SamplingFields(temperature=form.temperature, top_p=form.top_p, seed=form.seed, stop=form.stop,
                          stop_token_ids=form.stop_token_ids).sampling()
