"""The token-reward API on a real Ray Serve (127.0.0.1), over real HTTP, auth off.

One Serve application for the whole module; every answer is compared with the library scoring path.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tlcr_ray.config import load_config
from tlcr_ray.rl.rendezvous import free_port
from tlcr_ray.rl.text_scoring import score_items

pytestmark = pytest.mark.ray

PAIRS = [
    ("\n\nHuman: How do I bake bread?\n\nAssistant:", " Mix flour, water, salt and yeast, then knead and bake."),
    ("\n\nHuman: hi\n\nAssistant:", " Hello!"),
    ("", "No prompt at all, just a response."),
    ("\n\nHuman: Say something with émojis 🎉\n\nAssistant:", " Sure 🎉 — ünïcödé ok?"),
]


@pytest.fixture(scope="module")
def url(ray_local, spread_disc_dir):
    from ray import serve

    from serve.app import build_application

    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(load_config(None), spread_disc_dir), name="tlcr-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, path: str, body, **kwargs) -> requests.Response:
    if isinstance(body, (bytes, str)):
        return requests.post(url + path, data=body, headers={"content-type": "application/json"}, timeout=120, **kwargs)
    return requests.post(url + path, json=body, timeout=120, **kwargs)


@pytest.mark.parametrize("mode", ["continuous", "fixed", "no_negative", "no_positive"])
def test_token_rewards_equal_the_library(url, spread_disc, tokenizer, mode):
    reply = post(url, "/v1/token-rewards", {"items": [{"prompt": p, "response": r} for p, r in PAIRS], "mode": mode})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["mode"] == mode and len(body["items"]) == len(PAIRS)
    for got, want in zip(body["items"], score_items(spread_disc, tokenizer, PAIRS, mode=mode)):
        assert [t["id"] for t in got["tokens"]] == [t.id for t in want.tokens]
        assert [(t["text"], t["start"], t["end"]) for t in got["tokens"]] == [(t.text, t.start, t.end) for t in want.tokens]
        for g, w in zip(got["tokens"], want.tokens):
            assert g["p"] == pytest.approx(w.p, abs=1e-5) and g["reward"] == pytest.approx(w.reward, abs=1e-5)
        assert got["sum"] == pytest.approx(want.sum, abs=1e-5) and got["mean"] == pytest.approx(want.mean, abs=1e-5)


def test_get_reward_speaks_openrlhf(url, spread_disc, tokenizer):
    """Queries as OpenRLHF decodes them: prompt + response, special tokens and padding kept."""
    pad = tokenizer.pad_token
    queries = [pad * 2 + p + r + pad for p, r in PAIRS]
    reply = post(url, "/get_reward", {"query": queries, "prompts": [p for p, _ in PAIRS], "labels": ["x", None, 3, {}]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    want = score_items(spread_disc, tokenizer, PAIRS)
    assert body["rewards"] == pytest.approx([w.sum for w in want], abs=1e-5)
    assert body["scores"] == body["rewards"]
    assert body["extra_logs"]["token_reward_mean"] == pytest.approx([w.mean for w in want], abs=1e-5)
    assert body["extra_logs"]["num_tokens"] == [len(w.tokens) for w in want]


def test_get_reward_empty_response_is_the_stop_action_and_labels_are_optional(url, spread_disc, tokenizer):
    """An empty response is a PPO response that stopped at once: the EOS alone, scored."""
    prompt = "\n\nHuman: hi\n\nAssistant:"
    reply = post(url, "/get_reward", {"query": [prompt], "prompts": [prompt]})
    assert reply.status_code == 200, reply.text
    (want,) = score_items(spread_disc, tokenizer, [(prompt, "")])
    assert [t.id for t in want.tokens] == [tokenizer.eos_token_id]
    assert reply.json()["rewards"] == pytest.approx([want.sum], abs=1e-5)
    assert reply.json()["extra_logs"]["num_tokens"] == [1.0]


def test_a_response_the_tokenizer_drops_is_the_eos_alone(url):
    reply = post(url, "/v1/token-rewards", {"items": [{"prompt": "", "response": "\x1d"}]})
    assert reply.status_code == 200, reply.text
    (item,) = reply.json()["items"]
    assert [(t["text"], t["start"], t["end"]) for t in item["tokens"]] == [("", 1, 1)]
    reply = post(url, "/v1/token-rewards", {"items": [{"prompt": "", "response": "\x1d"}], "add_eos": False})
    assert reply.status_code == 200, reply.text
    assert reply.json()["items"] == [{"tokens": [], "sum": 0.0, "mean": 0.0}]


def test_add_eos_false_scores_the_response_as_cut_off(url, spread_disc, tokenizer):
    reply = post(url, "/v1/token-rewards", {"items": [{"prompt": p, "response": r} for p, r in PAIRS],
                                            "add_eos": False})
    assert reply.status_code == 200, reply.text
    for got, want in zip(reply.json()["items"], score_items(spread_disc, tokenizer, PAIRS, add_eos=False)):
        assert [t["id"] for t in got["tokens"]] == [t.id for t in want.tokens]
        assert tokenizer.eos_token_id not in [t.id for t in want.tokens]
        assert got["sum"] == pytest.approx(want.sum, abs=1e-5)


def test_health_model_info_and_docs(url, spread_disc_dir):
    assert requests.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(url + "/v1/model", timeout=30).json()
    assert info["checkpoint"].endswith("model") and info["auth"] is False
    assert info["modes"] == ["continuous", "fixed", "no_negative", "no_positive"] and info["max_tokens"] == 1024
    assert requests.get(url + "/docs", timeout=30).status_code == 200
    paths = requests.get(url + "/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/token-rewards", "/get_reward", "/healthz", "/v1/model"} <= set(paths)


ITEM = {"prompt": "p", "response": "r"}
BAD_INPUTS = [
    ("empty body", b"", 422, "body: Field required"),
    ("not JSON", b"{", 422, "JSON decode error"),
    ("invalid UTF-8", b'{"items": [{"prompt": "\xff\xfe", "response": "x"}]}', 400, "parsing the body"),
    ("a list body", b"[]", 422, "valid dictionary"),
    ("wrong type", {"items": [{"prompt": 1, "response": "x"}]}, 422, "items.0.prompt: Input should be a valid string"),
    ("items not a list", {"items": "abc"}, 422, "body.items"),
    ("unknown mode", {"items": [ITEM], "mode": "sequence"}, 422, "body.mode"),
    ("missing response", {"items": [{"prompt": "p"}]}, 422, "items.0.response: Field required"),
    ("missing items", {"mode": "fixed"}, 422, "body.items: Field required"),
    ("extra field", {"items": [ITEM], "temperature": 1}, 422, "temperature: Extra inputs are not permitted"),
    ("extra item field", {"items": [{**ITEM, "x": 1}]}, 422, "items.0.x: Extra inputs"),
    ("empty items", {"items": []}, 422, "at least 1 item"),
    ("empty response", {"items": [{"prompt": "p", "response": ""}]}, 422, "items.0.response: String should have at least 1"),
    ("too many items", {"items": [ITEM] * 65}, 422, "body.items: List should have at most 64 items after validation, not 65 (serve.max_items)"),
    ("huge string", {"items": [{"prompt": "p", "response": "x" * 20001}]}, 422, "items.0.response: String should have at most 20000 characters (serve.max_chars)"),
    ("too many tokens", {"items": [ITEM, {"prompt": "", "response": " a" * 1100}]}, 413, "items[1] has 1101 tokens; the limit is serve.max_tokens=1024"),  # 1100 + EOS
    ("huge body", b"x" * (8 * 1024 * 1024 + 1), 413, "serve.max_body_bytes"),
]


@pytest.mark.parametrize("body,status,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_4xx_naming_the_problem(url, body, status, message):
    reply = post(url, "/v1/token-rewards", body)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["detail"]


@pytest.mark.parametrize("body,message", [
    ({"query": ["a b"], "prompts": ["a", "b"]}, "prompts has 2 entries but query has 1"),
    ({"query": ["hello"], "prompts": ["bye"]}, "query[0] does not contain prompts[0]"),
    ({"query": [], "prompts": []}, "query: List should have at least 1 item"),
    ({"query": "abc", "prompts": ["a"]}, "body.query"),
    ({"query": ["abc"]}, "body.prompts: Field required"),
    ({"query": ["abc"], "prompts": ["a"], "extra": 1}, "extra: Extra inputs"),
])
def test_get_reward_bad_input(url, body, message):
    reply = post(url, "/get_reward", body)
    assert reply.status_code == 422, reply.text
    assert message in reply.json()["detail"]


def test_64_concurrent_clients_get_their_own_answers(url, spread_disc, tokenizer):
    pairs = [(f"\n\nHuman: question {i}?\n\nAssistant:", f" Answer number {i}" + " ok" * (i % 7)) for i in range(64)]
    want = score_items(spread_disc, tokenizer, pairs)

    def one(i: int):
        return post(url, "/v1/token-rewards", {"items": [{"prompt": pairs[i][0], "response": pairs[i][1]}]})

    with ThreadPoolExecutor(max_workers=64) as pool:
        replies = list(pool.map(one, range(64)))
    for reply, w in zip(replies, want):
        assert reply.status_code == 200, reply.text
        item = reply.json()["items"][0]
        assert [t["id"] for t in item["tokens"]] == [t.id for t in w.tokens]
        assert item["sum"] == pytest.approx(w.sum, abs=1e-5)


def test_the_scorer_runs_as_many_torch_threads_as_it_has_cpus(url, ray_local, spread_disc_dir):
    """serve.num_cpus (default auto: every core of a one-node Ray, capped by the node's Ray CPUs) is both
    the replica's reservation and its torch thread count; an explicit value is used as it is."""
    import os

    from ray import serve

    from serve.app import build_application

    def threads(app_name: str) -> int:
        return serve.get_deployment_handle("Scorer", app_name=app_name).torch_threads.remote().result()

    cores, node_cpus = len(os.sched_getaffinity(0)), int(ray_local.cluster_resources()["CPU"])
    assert load_config(None).serve.num_cpus is None
    assert threads("tlcr-test") == min(cores, node_cpus)
    serve.run(build_application(load_config(None, ["serve.num_cpus=1"]), spread_disc_dir),
              name="tlcr-one-cpu", route_prefix="/one-cpu")
    try:
        assert threads("tlcr-one-cpu") == 1
    finally:
        serve.delete("tlcr-one-cpu")


def test_metrics_reach_the_prometheus_endpoint(url, ray_local):
    """Request count, latency, batch size and tokens scored, as exported by Ray's metrics agent."""
    post(url, "/v1/token-rewards", {"items": [ITEM]})
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    wanted = ["ray_tlcr_requests_total", "ray_tlcr_request_latency_s_bucket", "ray_tlcr_batch_size_bucket",
              "ray_tlcr_tokens_scored_total"]
    missing = wanted
    for _ in range(60):  # the agent exports every few seconds
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        missing = [name for name in wanted if name not in text]
        if not missing:
            break
        time.sleep(1)
    assert not missing
    assert 'path="/v1/token-rewards"' in text and 'status="200"' in text


def test_deploy_serve_yaml_is_a_valid_serve_config_that_builds(spread_disc_dir, monkeypatch):
    """`serve run deploy/serve.yaml` reads this: Serve's own schema, then our builder with its args."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "serve.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    scorer = next(d for d in app.deployments if d.name == "Scorer")
    assert scorer.max_ongoing_requests >= load_config(None).serve.max_batch_size
    assert scorer.autoscaling_config["min_replicas"] <= scorer.autoscaling_config["max_replicas"]
    module, attribute = app.import_path.split(":")
    monkeypatch.setenv("TLCR_CHECKPOINT", spread_disc_dir)
    built = getattr(importlib.import_module(module), attribute)(app.args)
    assert {d.name for d in app.deployments} == {"Scorer", "TokenRewardAPI"} and built is not None
    monkeypatch.delenv("TLCR_CHECKPOINT")
    with pytest.raises(Exception, match="not a discriminator folder"):
        getattr(importlib.import_module(module), attribute)({**app.args, "checkpoint": "/nonexistent"})
