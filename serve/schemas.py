"""Request and response bodies of the token-reward API (they make its OpenAPI schema).

Unknown fields are rejected (422) so a typo never silently changes what gets scored. Request models are
built per app (`request_models`) because their size limits come from the config.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tlcr_ray.rl.rewards import TOKEN_MODES

Mode = Literal[TOKEN_MODES]  # type: ignore[valid-type]  # the library's list, one definition


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def request_models(max_items: int, max_chars: int) -> tuple[type[BaseModel], type[BaseModel]]:
    """(TokenRewardsRequest, GetRewardRequest) with the configured limits in their schema (so /openapi.json
    documents them and schemathesis respects them); pydantic enforces them as 422s."""
    Text = Annotated[str, Field(max_length=max_chars)]

    class Item(Strict):
        prompt: Text = Field(description="The conversation so far; may be empty.")
        response: Text = Field(min_length=1, description="The text to score, token by token.")

    class TokenRewardsRequest(Strict):
        items: list[Item] = Field(min_length=1, max_length=max_items)
        mode: Mode = Field("continuous", description="continuous: 2p-1; fixed: +1/-1/0 by thresholds; "
                                                     "no_negative / no_positive: the ablations.")
        add_eos: bool = Field(True, description="Score each response as finished: it ends with the tokenizer's "
                                                "EOS token (text \"\", span at the response's end), as a PPO "
                                                "response that stopped does. false: score it as cut off.")

    class GetRewardRequest(Strict):
        """OpenRLHF's remote reward-model request: `query` is prompt + response, decoded with special tokens."""

        query: list[Text] = Field(min_length=1, max_length=max_items)
        prompts: list[Text] = Field(max_length=max_items, description="The prompt of each query, a prefix of it.")
        labels: list[Any] | None = Field(None, description="Accepted and ignored.")

    return TokenRewardsRequest, GetRewardRequest


class TokenOut(BaseModel):
    id: int
    text: str = Field(description="response[start:end]; byte pieces of one character share its span")
    start: int = Field(description="character offset in the response")
    end: int
    p: float = Field(description="discriminator probability that the token is good")
    reward: float


class ItemOut(BaseModel):
    tokens: list[TokenOut]
    sum: float
    mean: float


class TokenRewardsResponse(BaseModel):
    model: str = Field(description="checkpoint folder that scored the items")
    mode: Mode
    items: list[ItemOut]


class GetRewardResponse(BaseModel):
    rewards: list[float] = Field(description="sequence score per query: sum or mean of its token rewards")
    scores: list[float] = Field(description="the same as rewards")
    extra_logs: dict[str, list[float]] = Field(description="per query: token_reward_sum, token_reward_mean, num_tokens")


class ModelInfo(BaseModel):
    checkpoint: str
    tokenizer: str
    model_class: str
    modes: list[str]
    default_mode: str
    sequence_score: str
    max_items: int
    max_chars: int
    max_tokens: int
    max_body_bytes: int
    max_batch_size: int
    auth: bool


class Health(BaseModel):
    status: Literal["ok"]


class ErrorResponse(BaseModel):
    detail: str
    errors: list[dict[str, Any]] | None = None


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422)}
