"""Ray Serve application: a FastAPI ingress over a dynamically batched discriminator.

    tlcr serve --checkpoint runs/demo/disc/model [--host 127.0.0.1 --port 8000]     # blocks until Ctrl-C
    TLCR_CHECKPOINT=runs/demo/disc/model serve run deploy/serve.yaml

    curl -s 127.0.0.1:8000/v1/token-rewards -H 'content-type: application/json' \\
         -d '{"items": [{"prompt": "\\n\\nHuman: hi\\n\\nAssistant:", "response": " Hello!"}]}'

Two deployments: `TokenRewardAPI` (HTTP, validation, auth, limits, tokenization) sends one call per
item to `Scorer`, whose `@serve.batch` method runs one forward pass over up to `max_batch_size`
items from any requests. Scores come from `tlcr_ray.rl.text_scoring`, the library's own scoring path.
The scorer runs torch with as many threads as Ray reserved CPUs for it (`serve.num_cpus`; auto: the
whole machine on a one-node Ray), so the reservation and the compute agree.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import replace

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_init import ensure_ray
from serve.limits import Limits
from serve.metrics import ScorerMetrics
from serve.schemas import ModelInfo
from tlcr_ray.choices import SEQUENCE_SCORES
from tlcr_ray.config import Config, ConfigError, RewardConfig, ServeConfig, load_config
from tlcr_ray.data.tokens import Encoded
from tlcr_ray.local_ray import LOOPBACK
from tlcr_ray.rl.rewards import TOKEN_MODES
from tlcr_ray.rl.text_scoring import (
    ItemScore,
    item_score,
    resolve_discriminator,
    response_probabilities,
    tokenizer_folder,
)

APP_NAME = "tlcr"


def pin_serve_grpc_to_loopback() -> None:
    """Call first thing in a Serve deployment's `__init__` (Serve starts the replica's gRPC server after it).

    Ray Serve 2.60 binds each replica's inter-deployment gRPC server to "[::]:0" whatever the node IP
    (ray/serve/_private/replica.py). On a loopback-only Ray, bind it to 127.0.0.1; elsewhere leave it.
    """
    replica = sys.modules.get("ray.serve._private.replica")  # present only inside a replica process
    if replica is None or getattr(replica.add_port_to_grpc_server, "tlcr_loopback", False):
        return
    if not ray.is_initialized() or ray.util.get_node_ip_address() != LOOPBACK:
        return
    original = replica.add_port_to_grpc_server

    def add_port(server, address: str) -> int:
        return original(server, f"{LOOPBACK}:0" if address == "[::]:0" else address)

    add_port.tlcr_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port


@serve.deployment
class Scorer:
    """Holds the discriminator; batches items across requests into one forward pass."""

    def __init__(self, checkpoint: str, tokenizer: str, serve_cfg: ServeConfig, reward_cfg: RewardConfig):
        pin_serve_grpc_to_loopback()  # before Serve starts this replica's gRPC server (after __init__)
        import torch

        from tlcr_ray.models import TokenDiscriminator, load_head_model, load_tokenizer

        # Ray exports OMP_NUM_THREADS only for whole CPUs; torch is told directly, from the reservation
        # Ray actually made (a deploy/serve.yaml ray_actor_options override wins over serve.num_cpus).
        torch.set_num_threads(replica_threads(serve_cfg.num_cpus))
        model = load_head_model(checkpoint, dtype=serve_cfg.dtype)
        if not isinstance(model, TokenDiscriminator):
            raise ValueError(f"{checkpoint}: a {type(model).__name__}, not a token discriminator")
        # Ray sets CUDA_VISIBLE_DEVICES per replica: a GPU is visible only when num_gpus > 0.
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.pad_token_id = load_tokenizer(tokenizer).pad_token_id
        self.thresholds = (reward_cfg.fixed_pos_threshold, reward_cfg.fixed_neg_threshold)
        self.micro_batch_size = serve_cfg.forward_micro_batch_size
        self.metrics = ScorerMetrics()
        self.score_batch.set_max_batch_size(serve_cfg.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(serve_cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def score_batch(self, requests: list[tuple[str, Encoded, str]]) -> list[ItemScore]:
        encoded = [enc for _, enc, _ in requests]
        # A thread keeps the replica's event loop collecting the next batch while this one runs.
        probs = await asyncio.to_thread(response_probabilities, self.model, encoded, self.pad_token_id,
                                        self.micro_batch_size)
        self.metrics.observe(len(requests), sum(len(enc.input_ids) for enc in encoded))
        return [item_score(response, enc, p, mode, *self.thresholds)
                for (response, enc, mode), p in zip(requests, probs)]

    async def score(self, response: str, encoded: Encoded, mode: str) -> ItemScore:
        return await self.score_batch((response, encoded, mode))

    def torch_threads(self) -> int:
        """torch's intra-op thread count in this replica (what serve.num_cpus turned into)."""
        import torch

        return torch.get_num_threads()


@serve.deployment
@serve.ingress()
class TokenRewardAPI:
    """HTTP face: everything but the forward pass. Auth key read from this replica's environment."""

    def __init__(self, scorer: DeploymentHandle, checkpoint: str, tokenizer: str, serve_cfg: ServeConfig):
        pin_serve_grpc_to_loopback()  # before Serve starts this replica's gRPC server (after __init__)
        from tlcr_ray.models import load_tokenizer

        self.scorer = scorer
        self.tokenizer = load_tokenizer(tokenizer)
        self.pad_token = self.tokenizer.pad_token
        self.api_key = os.environ.get(serve_cfg.api_key_env) or None
        self.limits = Limits(serve_cfg.max_items, serve_cfg.max_chars, serve_cfg.max_tokens, serve_cfg.max_body_bytes)
        self.sequence_score = serve_cfg.sequence_score
        self.get_reward_mode = serve_cfg.mode
        self.info = ModelInfo(
            checkpoint=checkpoint, tokenizer=tokenizer,
            model_class="TokenDiscriminator", modes=list(TOKEN_MODES), default_mode="continuous",
            sequence_score=serve_cfg.sequence_score, max_items=serve_cfg.max_items, max_chars=serve_cfg.max_chars,
            max_tokens=serve_cfg.max_tokens, max_body_bytes=serve_cfg.max_body_bytes,
            max_batch_size=serve_cfg.max_batch_size, auth=self.api_key is not None)

    def __serve_build_asgi_app__(self):
        from serve.routes import build_fastapi_app

        return build_fastapi_app(self)

    async def score(self, response: str, encoded: Encoded, mode: str) -> ItemScore:
        return await self.scorer.score.remote(response, encoded, mode)


def replica_threads(configured: float | None) -> int:
    """torch threads of a scorer replica: the CPUs Ray assigned to it (else `configured`), at least 1."""
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU") if ray.is_initialized() else None
    return max(1, int(assigned or configured or 1))


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_scorer_cpus(max_replicas: int = 1) -> float:
    """`serve.num_cpus: null`: every core of this machine on a one-node Ray (capped by that node's Ray
    CPUs so the replica can be placed, and shared among `max_replicas` so all of them can); 1 on a
    multi-node cluster, whose node sizes we cannot guess. Before Ray is up (it will be started
    locally on this machine): this machine's cores."""
    import ray

    cores = machine_cores()
    if ray.is_initialized():
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        if len(nodes) != 1:
            return 1.0
        cores = min(cores, int(nodes[0].get("Resources", {}).get("CPU", cores)))
    return float(max(1, cores // max(1, max_replicas)))


def resolve_checkpoint(cfg: Config, checkpoint: str | None = None) -> str:
    return str(resolve_discriminator(cfg, checkpoint))


def validate(serve_cfg: ServeConfig) -> None:
    if serve_cfg.sequence_score not in SEQUENCE_SCORES:
        raise ConfigError(f"serve.sequence_score: expected one of {', '.join(SEQUENCE_SCORES)}, "
                          f"got {serve_cfg.sequence_score!r}")
    if serve_cfg.mode not in TOKEN_MODES:
        raise ConfigError(f"serve.mode: expected one of {', '.join(TOKEN_MODES)}, got {serve_cfg.mode!r}")
    if serve_cfg.max_ongoing_requests < serve_cfg.max_batch_size:
        raise ConfigError(f"serve.max_ongoing_requests={serve_cfg.max_ongoing_requests} would cap batches below "
                          f"serve.max_batch_size={serve_cfg.max_batch_size}")
    if not 1 <= serve_cfg.min_replicas <= serve_cfg.max_replicas:
        raise ConfigError(f"serve.min_replicas/max_replicas: need 1 <= min <= max, got "
                          f"{serve_cfg.min_replicas}, {serve_cfg.max_replicas}")


def build_application(cfg: Config, checkpoint: str | None = None, ingress_env: dict[str, str] | None = None):
    """The bound Serve application for `cfg` (serve section + reward thresholds).

    `ingress_env` adds environment variables to the ingress replica only (e.g. the API key in tests).
    """
    validate(cfg.serve)
    checkpoint = resolve_checkpoint(cfg, checkpoint)
    tokenizer = tokenizer_folder(cfg, checkpoint)
    s = cfg.serve if cfg.serve.num_cpus is not None else replace(cfg.serve, num_cpus=auto_scorer_cpus(cfg.serve.max_replicas))
    scorer = Scorer.options(
        max_ongoing_requests=s.max_ongoing_requests,
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    ).bind(checkpoint, tokenizer, s, cfg.reward)
    ingress_options = {"num_cpus": 0}
    if ingress_env:
        ingress_options["runtime_env"] = {"env_vars": dict(ingress_env)}
    # Each HTTP request fans out into per-item calls, so the ingress must hold many requests at once.
    return TokenRewardAPI.options(max_ongoing_requests=max(256, s.max_items * 4),
                                  ray_actor_options=ingress_options).bind(scorer, checkpoint, tokenizer, s)


def build_app(args: dict):
    """Serve app builder for `serve run deploy/serve.yaml` (import_path serve.app:build_app).

    args: `config` (YAML, optional), `overrides` (list of key=value), `checkpoint`
    (default: $TLCR_CHECKPOINT, then serve.checkpoint, then <output_dir>/disc/model).
    """
    known = {"config", "overrides", "checkpoint"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"serve.yaml args: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    return build_application(cfg, args.get("checkpoint") or os.environ.get("TLCR_CHECKPOINT"))


def run_cli(cfg: Config, args) -> dict:
    """`tlcr serve`: start (or join) Ray, deploy, block until Ctrl-C, then shut Serve down."""
    cfg.serve = replace(cfg.serve, host=args.host or cfg.serve.host, port=args.port or cfg.serve.port)
    validate(cfg.serve)
    checkpoint = resolve_checkpoint(cfg, args.checkpoint)  # a bad checkpoint fails before Ray starts
    ensure_ray()  # first: serve.num_cpus auto reads the node's CPUs
    application = build_application(cfg, checkpoint)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(application, name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"tlcr serve: {url}/v1/token-rewards, {url}/get_reward, docs at {url}/docs (Ctrl-C stops)", flush=True)
    began = time.time()
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through cli.main's stop_on_signals()
        pass
    finally:
        serve.shutdown()
    return {"url": url, "checkpoint": checkpoint, "served_s": round(time.time() - began, 1)}
