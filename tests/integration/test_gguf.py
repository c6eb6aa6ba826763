"""The embedded GGUF -> HF folder conversion: reloads without gguf and matches the GGUF model's logits."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tlcr_ray import models

# Runs in a fresh interpreter where `import gguf` fails, so the folder cannot lean on the GGUF reader.
RELOAD_WITHOUT_GGUF = """
import sys
sys.modules["gguf"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


@pytest.mark.slow
def test_gguf_conversion_reloads_without_gguf_and_matches(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("TLCR_CACHE", str(tmp_path / "cache"))
    folder = models.embedded_model_dir()
    assert folder.is_relative_to(tmp_path / "cache")
    assert (folder / "config.json").exists() and list(folder.glob("*.safetensors"))
    assert models.embedded_model_dir() == folder  # second call reuses the folder

    tokenizer = models.load_tokenizer(str(folder))
    ids = tokenizer(["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"], return_tensors="pt")["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_GGUF, str(folder), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True)
    reloaded = torch.load(tmp_path / "logits.pt")

    from transformers import AutoModelForCausalLM

    gguf = models.embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        expected = reference.eval()(input_ids=ids).logits
    assert expected.shape == reloaded.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.allclose(expected, reloaded, atol=1e-4), (expected - reloaded).abs().max()
