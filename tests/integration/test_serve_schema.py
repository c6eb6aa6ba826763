"""The API with auth on: bearer-token checks, and schemathesis fuzzing of /openapi.json (no 5xx, answers
match the schema). One Serve application for the module; the key reaches only the ingress replica."""
from __future__ import annotations

import socket

import pytest
import requests
from hypothesis import HealthCheck, given, settings

from tlcr_ray.config import load_config
from tlcr_ray.models import TokenDiscriminator, save_head_model

pytestmark = pytest.mark.ray

API_KEY = "test-key-7f3a9c"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ITEMS = {"items": [{"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " Hello!"}]}


@pytest.fixture(scope="module")
def url(ray_local, tiny_model_dir, tokenizer, tmp_path_factory):
    from ray import serve

    from serve.app import build_application

    model = TokenDiscriminator.from_pretrained(tiny_model_dir, seed=0)
    disc_dir = save_head_model(model, tmp_path_factory.mktemp("disc") / "model", tokenizer=tokenizer)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Small limits keep fuzzed requests cheap. The token limit is the one limit a schema cannot state, so it
    # sits above what max_chars allows (byte-level BPE: <= 4 tokens per character) to keep schema-valid
    # requests valid; test_serve.py covers the token limit.
    cfg = load_config(None, ["serve.max_items=8", "serve.max_chars=300", "serve.max_tokens=2500",
                             "serve.max_body_bytes=65536"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(cfg, str(disc_dir), ingress_env={"TLCR_API_KEY": API_KEY}),
              name="tlcr-schema", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.mark.parametrize("path,body", [("/v1/token-rewards", ITEMS),
                                       ("/get_reward", {"query": ["a b"], "prompts": ["a"]})])
def test_scoring_routes_need_the_bearer_token(url, path, body):
    assert requests.post(url + path, json=body, timeout=60).status_code == 401
    wrong = requests.post(url + path, json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and API_KEY not in wrong.text
    assert "bearer token" in wrong.json()["detail"]
    not_bearer = requests.post(url + path, json=body, headers={"Authorization": f"Basic {API_KEY}"}, timeout=60)
    assert not_bearer.status_code == 401
    assert requests.post(url + path, json=body, headers=AUTH, timeout=60).status_code == 200


def test_model_info_needs_the_token_and_health_does_not(url):
    assert requests.get(url + "/v1/model", timeout=60).status_code == 401
    info = requests.get(url + "/v1/model", headers=AUTH, timeout=60).json()
    assert info["auth"] is True and info["max_items"] == 8 and API_KEY not in str(info)
    assert requests.get(url + "/healthz", timeout=60).status_code == 200
    schema = requests.get(url + "/openapi.json", timeout=60).json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_limits_follow_the_config(url):
    reply = requests.post(url + "/v1/token-rewards", json={"items": ITEMS["items"] * 9}, headers=AUTH, timeout=60)
    assert reply.status_code == 422 and "at most 8 items" in reply.json()["detail"]
    reply = requests.post(url + "/get_reward", json={"query": ["a" + " b" * 200], "prompts": ["a"]},
                          headers=AUTH, timeout=60)
    assert reply.status_code == 422 and "at most 300 characters (serve.max_chars)" in reply.json()["detail"]
    reply = requests.post(url + "/get_reward", data=b"x" * 65537, headers={**AUTH, "content-type": "application/json"},
                          timeout=60)
    assert reply.status_code == 413 and "serve.max_body_bytes=65536" in reply.json()["detail"]
    schema = requests.get(url + "/openapi.json", timeout=60).json()["components"]["schemas"]
    assert schema["TokenRewardsRequest"]["properties"]["items"]["maxItems"] == 8


CASES_PER_OPERATION = 75  # per route and generation mode: ~375 requests (GET /healthz has a single case)


def test_schemathesis_finds_no_5xx_and_answers_match_the_schema(url):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    calls = []
    for result in schema.get_all_operations():
        operation = result.ok()
        # Negative data needs something to break: the GET routes take no input at all.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.lower() == "post" else [])
        for generation_mode in modes:
            @settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=generation_mode))
            def check(case):
                calls.append(operation.label)
                # /get_reward has rules JSON Schema cannot state (one prompt per query, the query contains
                # its prompt), so a schema-valid request may rightly get a 422 there.
                excluded = [positive_data_acceptance] if operation.path == "/get_reward" else None
                case.call_and_validate(base_url=url, headers=AUTH, timeout=60, excluded_checks=excluded)

            check()
    print({label: calls.count(label) for label in set(calls)})
    assert len(calls) >= 300, f"only {len(calls)} schemathesis cases ran"
