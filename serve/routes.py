"""The FastAPI app of the token-reward API: validation, auth, limits, and the two scoring routes.

`build_fastapi_app(service)` is called inside the ingress replica (`serve/app.py`), so auth follows the
replica's own environment. `service` supplies `tokenizer`, `info` (ModelInfo), `api_key`, `limits`,
`score(response, encoded, mode) -> ItemScore` (awaitable) and the /get_reward settings.
"""
# No `from __future__ import annotations`: FastAPI must see the per-app request models defined below.
import asyncio

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve.auth import make_auth_dependency
from serve.limits import BodySizeLimit, check_tokens, limit_hint
from serve.metrics import IngressMetrics, MetricsMiddleware
from serve.schemas import (
    ERRORS,
    GetRewardResponse,
    Health,
    ItemOut,
    ModelInfo,
    TokenOut,
    TokenRewardsResponse,
    request_models,
)
from serve.ui import add_ui_routes
from tlcr_ray.rl.text_scoring import ItemScore, encode_items


def build_fastapi_app(service) -> FastAPI:
    app = FastAPI(title="tlcr token-reward API",
                  description="Per-token rewards from a TLCR discriminator (docs/algorithm.md §5). "
                              "Limits are listed by GET /v1/model.",
                  version="1.0")
    auth = make_auth_dependency(service.api_key)
    limits = service.limits
    TokenRewardsRequest, GetRewardRequest = request_models(limits.max_items, limits.max_chars)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Our own shape: one readable line plus the structured errors, never echoing the (maybe huge) input.
        errors = [{"loc": [str(part) for part in err.get("loc", ())], "msg": str(err.get("msg", "")) + limit_hint(err),
                   "type": str(err.get("type", ""))} for err in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in errors) or "invalid request"
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    async def score_all(responses: list[str], prompts: list[str], field: str, mode: str, add_eos: bool = True):
        """Encode jointly (as training does; a finished response ends with EOS), check token limits, score
        each item through the batcher."""
        encoded = encode_items(service.tokenizer, list(zip(prompts, responses)), add_eos=add_eos)
        check_tokens(limits, [len(enc.input_ids) for enc in encoded], field)
        # A response with no tokens (empty, or only characters the tokenizer drops) scores 0 without a forward.
        return await asyncio.gather(*[service.score(response, enc, mode) if len(enc.input_ids) > enc.response_start
                                      else _empty() for response, enc in zip(responses, encoded)])

    @app.post("/v1/token-rewards", response_model=TokenRewardsResponse, responses=ERRORS,
              dependencies=[Depends(auth)], summary="Per-token rewards of (prompt, response) items")
    async def token_rewards(body: TokenRewardsRequest) -> TokenRewardsResponse:
        scored = await score_all([it.response for it in body.items], [it.prompt for it in body.items],
                                 "items", body.mode, body.add_eos)
        return TokenRewardsResponse(
            model=service.info.checkpoint, mode=body.mode,
            items=[ItemOut(tokens=[TokenOut(**vars(t)) for t in s.tokens], sum=s.sum, mean=s.mean) for s in scored])

    @app.post("/get_reward", response_model=GetRewardResponse, responses=ERRORS, dependencies=[Depends(auth)],
              summary="OpenRLHF remote reward model: one sequence score per query")
    async def get_reward(body: GetRewardRequest) -> GetRewardResponse:
        if len(body.prompts) != len(body.query):
            raise HTTPException(422, f"prompts has {len(body.prompts)} entries but query has {len(body.query)}; "
                                     "expected one prompt per query")
        prompts, responses = zip(*[split_query(q, p, service.pad_token, i)
                                   for i, (q, p) in enumerate(zip(body.query, body.prompts))])
        scored = await score_all(list(responses), list(prompts), "query", service.get_reward_mode)
        sums, means = [s.sum for s in scored], [s.mean for s in scored]
        rewards = sums if service.sequence_score == "sum" else means
        return GetRewardResponse(rewards=rewards, scores=rewards,
                                 extra_logs={"token_reward_sum": sums, "token_reward_mean": means,
                                             "num_tokens": [float(len(s.tokens)) for s in scored]})

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/v1/model", response_model=ModelInfo, responses={401: ERRORS[401]}, dependencies=[Depends(auth)])
    async def model_info() -> ModelInfo:
        return service.info

    add_ui_routes(app)  # GET / and /ui: the browser page (no auth; its API calls send the key)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=IngressMetrics(),
                       paths=("/v1/token-rewards", "/get_reward", "/healthz", "/v1/model"))
    return app


def split_query(query: str, prompt: str, pad_token: str | None, index: int) -> tuple[str, str]:
    """OpenRLHF sends prompt + response decoded with special tokens: strip padding, cut after the prompt.

    A prefix before the prompt (e.g. a BOS the decoder added) stays with the prompt.
    """
    if pad_token:
        while query.startswith(pad_token):
            query = query[len(pad_token):]
        while query.endswith(pad_token):
            query = query[: -len(pad_token)]
    cut = query.find(prompt)
    if cut < 0:
        raise HTTPException(422, f"query[{index}] does not contain prompts[{index}]; "
                                 "each query must be its prompt followed by the response")
    cut += len(prompt)
    return query[:cut], query[cut:]


async def _empty() -> ItemScore:
    return ItemScore(tokens=[], sum=0.0, mean=0.0)
