"""Every checkpoint format, read and write: GGUF (the format itself is gguf.py), Hugging Face safetensors (single
or sharded), Meta's `.pth`, and a nute.py run folder (settings, the training state, the adapter of masks + LoRA). Our
parameter names are Meta's; the others are renamed.

    model, tok = load("SmolLM2-135M-Instruct.Q4_1.gguf")   # or an HF folder, or a Meta folder
    save(small, tok, "runs/x/model")                        # HF layout + config.json with per-layer sizes
    adapter = load_adapter("runs/x", model)                 # what nute.py learned, checked against the model

The command line writes any checkpoint, or a run's pruned model, for llama.cpp or Hugging Face:

    python -m formats.checkpoint --run runs/default --out pruned.gguf --type Q8_0
    python -m formats.checkpoint --run runs/default --out pruned-hf --uniform
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from formats import hub
from formats.gguf import FILE_TYPE, GGUFError, quantize, read_gguf, write_gguf, write_gguf_metadata
from formats.layout import pad_model
from formats.tokenizer import gguf_tokenizer, hf_tokenizer_files, load_tokenizer
from masks import mask_shapes
from model import ModelConfig, build, slice_model


class LoadError(Exception):
    """A checkpoint, tokenizer or adapter that cannot be loaded; the command line prints it as one line."""


# ----------------------------------------------------------------------------------------------------
# Hugging Face and Meta folders, and `load` for any of the three

HF_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output",
            "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
            "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
            "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm", "model.layers": "layers"}
GGUF_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output", "blk": "layers",
              "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
              "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
              "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}


def rename(name, table):
    for old, new in table.items():  # longest keys first would matter only for prefixes; none overlap
        if name.startswith(old + ".") or ("." + old + ".") in name:
            name = name.replace(old, new, 1)
    return name


def interleaved_to_half(w, n_heads):
    """Meta and GGUF store q/k rows for interleaved RoPE (pairs 2i, 2i+1); we use rotate-half (i, i+d/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def config_value(cfg, where, key, default=None, ok=lambda v: type(v) is int and v > 0, what="a positive integer"):
    """cfg[key] of a config.json or GGUF metadata (default when absent or null), checked: "576" or 4.0 would fail deep
    inside torch, 0 in a division."""
    v = default if cfg.get(key) is None else cfg[key]
    if not ok(v):
        raise LoadError(f"{where}: {key} is {'missing' if v is None else json.dumps(v)[:40]}, not {what}")
    return v


def hf_layers(cfg, where, key, n_layers, ok, what):
    """One of our per-layer lists (kv_of_head, ffn_dims), or None: num_hidden_layers entries, each ok(entry)."""
    v = cfg.get(key)
    if v is not None and not (isinstance(v, list) and len(v) == n_layers and all(map(ok, v))):
        raise LoadError(f"{where}: {key} must be {n_layers} {what}, one per layer (num_hidden_layers {n_layers})")
    return v


def min_params(n_layers, dim, vocab, head_dim, heads, kv, ffn):
    """A lower bound on the parameters of a config (heads, kv, ffn: per layer, or one int), by arithmetic alone."""
    layer = lambda n, k, f: (2 * n + 2 * k) * head_dim * dim + 3 * f * dim
    if not any(isinstance(v, list) for v in (heads, kv, ffn)):
        return vocab * dim + n_layers * layer(heads, kv, ffn)
    return vocab * dim + sum(map(layer, *(v if isinstance(v, list) else [v] * n_layers for v in (heads, kv, ffn))))


def config_from_hf(cfg, where="config.json", weight_bytes=None):
    """config.json (plus our per-layer sizes) -> ModelConfig; a bad value is a LoadError naming its key. A config its
    weight files cannot hold (weight_bytes; a byte a parameter at least) is refused before anything is allocated."""
    num = lambda key, default=None: config_value(cfg, where, key, default)
    positive = lambda v: type(v) in (int, float) and v > 0
    real = lambda key, default: config_value(cfg, where, key, default, positive, "a positive number")
    dim, n_layers, n_heads = num("hidden_size"), num("num_hidden_layers"), num("num_attention_heads")
    n_kv, ffn_dim, vocab = num("num_key_value_heads", n_heads), num("intermediate_size"), num("vocab_size")
    if cfg.get("head_dim") is None and dim % n_heads:
        raise LoadError(f"{where}: hidden_size {dim} is not divisible by num_attention_heads {n_heads} (no head_dim)")
    head_dim, count = num("head_dim", dim // n_heads), lambda x: type(x) is int and x >= 0
    kv_heads = lambda x: isinstance(x, list) and all(map(count, x)) and max(x, default=-1) < len(x)  # model.Attention
    kv_of_head = hf_layers(cfg, where, "kv_of_head", n_layers, kv_heads, "lists of kv heads (no more than heads)")
    ffn_dims = hf_layers(cfg, where, "ffn_dims", n_layers, count, "FFN widths")
    if kv_of_head is None and n_heads % n_kv:
        raise LoadError(f"{where}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    tie = config_value(cfg, where, "tie_word_embeddings", False, lambda v: isinstance(v, bool), "true or false")
    if weight_bytes is not None:
        heads = [len(k) for k in kv_of_head] if kv_of_head else n_heads
        kv = [max(k, default=-1) + 1 for k in kv_of_head] if kv_of_head else n_kv
        need = min_params(n_layers, dim, vocab, head_dim, heads, kv, ffn_dims or ffn_dim) + 2 * n_layers * dim  # norms
        if need > weight_bytes:
            raise LoadError(f"{where}: num_hidden_layers {n_layers}, hidden_size {dim}, intermediate_size {ffn_dim}... "
                            f"make {need:,} parameters at least, more than its weight files' {weight_bytes:,} bytes")
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=ffn_dim,
                       vocab_size=vocab, norm_eps=real("rms_norm_eps", 1e-6), rope_theta=real("rope_theta", 10000.0),
                       tie_embeddings=tie, max_seq_len=min(num("max_position_embeddings", 2048), 8192),
                       kv_of_head=kv_of_head, ffn_dims=ffn_dims)


def hf_config(config):
    """The config.json an exported model is saved with: Hugging Face's keys plus our per-layer sizes."""
    c = config
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
            "intermediate_size": c.ffn_dim, "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings,
            "max_position_embeddings": c.max_seq_len, "kv_of_head": c.kv_of_head, "ffn_dims": c.ffn_dims}


def read_hf(path):
    where = os.path.join(path, "config.json")
    with open(where) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise LoadError(f"{where}: not a JSON object")
    if cfg.get("rope_scaling"):
        raise LoadError(f"{path}: rope_scaling {cfg['rope_scaling']} is not supported")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise LoadError(f"{path}: config.json but no model.safetensors or model.safetensors.index.json")
    if missing := [f for f in files if not os.path.isfile(os.path.join(path, f))]:
        raise LoadError(f"{os.path.join(path, missing[0])}: not found (model.safetensors.index.json lists it)")
    config, state = config_from_hf(cfg, where, sum(os.path.getsize(os.path.join(path, f)) for f in files)), {}
    for file in files:  # one tensor at a time, so peak memory stays about one copy of the weights
        try:
            with safe_open(os.path.join(path, file), "pt") as f:
                for key in f.keys():
                    if not key.endswith("rotary_emb.inv_freq"):  # older HF files store RoPE tables
                        state[rename(key, HF_NAMES)] = f.get_tensor(key)
        except Exception as e:  # truncated or corrupt file
            raise LoadError(f"{os.path.join(path, file)}: cannot read safetensors ({e})") from None
    if config.tie_embeddings:
        state.pop("output.weight", None)  # some tied checkpoints store the shared matrix twice
    return config, state


def read_meta(path):
    with open(os.path.join(path, "params.json")) as f:
        p = json.load(f)
    files = sorted(f for f in os.listdir(path) if f.startswith("consolidated.") and f.endswith(".pth"))
    if not files:
        raise LoadError(f"{path}: params.json but no consolidated.*.pth")
    try:
        shards = [torch.load(os.path.join(path, f), map_location="cpu", mmap=True, weights_only=True) for f in files]
    except Exception as e:
        raise LoadError(f"{path}: cannot read {files} ({e})") from None
    state = {}
    for key in shards[0]:  # model-parallel shards: columns split for wo, w2, embeddings; rows otherwise
        parts = [s[key] for s in shards]
        if parts[0].dim() == 1 or len(parts) == 1:
            state[key] = parts[0]
        else:
            state[key] = torch.cat(parts, dim=1 if key.split(".")[-2] in ("wo", "w2", "tok_embeddings") else 0)
    state.pop("rope.freqs", None)
    n_heads = p["n_heads"]
    config = ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=n_heads, n_kv_heads=p.get("n_kv_heads") or n_heads,
                        head_dim=p["dim"] // n_heads, ffn_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
                        vocab_size=state["tok_embeddings.weight"].shape[0], norm_eps=p.get("norm_eps", 1e-5),
                        rope_theta=p.get("rope_theta", 10000.0), tie_embeddings="output.weight" not in state)
    return config, state


def gguf_sizes(path, meta, arch, tensors):
    """A GGUF's sizes, checked against each other and the tensors it holds before anything is made from them (a
    block_count of 10^8 would make lists of 10^8) -> n_layers, dim, per-layer heads, kv heads, FFN widths, head size."""
    key, count = lambda k: f"{arch}.{k}", lambda x: type(x) is int and x >= 0  # a bool or float is no count
    n_layers, dim = config_value(meta, path, key("block_count")), config_value(meta, path, key("embedding_length"))
    per_layer = lambda v: count(v) or isinstance(v, list) and len(v) == n_layers and all(map(count, v))
    layers = lambda k, d=None: config_value(meta, path, key(k), d, per_layer, f"a count, or a list of {n_layers}")
    heads, ffn = layers("attention.head_count"), layers("feed_forward_length")
    kv = layers("attention.head_count_kv", heads)
    blocks = {k.split(".")[1] for k in tensors if k.startswith("blk.")}
    if isinstance(heads, int) and n_layers != len(blocks):  # the same heads in every layer: each has tensors
        raise LoadError(f"{path}: {key('block_count')} is {n_layers}, but the file holds {len(blocks)} blocks")
    heads, kv, ffn = ([v] * n_layers if isinstance(v, int) else v for v in (heads, kv, ffn))
    size_key = next((key(k) for k in ("attention.key_length", "rope.dimension_count") if key(k) in meta), None)
    if size_key is None and (not heads[0] or dim % heads[0]):  # llama.cpp's head size: embedding / layer 0's heads
        raise LoadError(f"{path}: {key('embedding_length')} {dim} is not divisible by {key('attention.head_count')} "
                        f"{heads[0]} (and no {key('attention.key_length')})")
    head_dim = config_value(meta, path, size_key) if size_key else dim // heads[0]
    need = min_params(n_layers, dim, len(tensors.get("token_embd.weight", ())), head_dim, heads, kv, ffn)
    if need > (have := sum(t.size for t in tensors.values())):
        raise LoadError(f"{path}: {key('block_count')} {n_layers}, embedding_length {dim}, up to {max(heads)} heads of "
                        f"{head_dim}, FFN up to {max(ffn)} make {need:,} parameters at least; the file holds {have:,}")
    for i, (n, k) in enumerate(zip(heads, kv)):
        if n and (not k or n % k):
            raise LoadError(f"{path}: {key('attention.head_count_kv')}: layer {i} has {n} heads, not groups of {k}")
        for name, rows, what in (("attn_q", n, "attention.head_count"), ("attn_k", k, "attention.head_count_kv")):
            if n and len(tensors.get(f"blk.{i}.{name}.weight", ())) not in (0, rows * head_dim):
                raise LoadError(f"{path}: blk.{i}.{name}.weight does not have {key(what)} {rows} x {head_dim} rows")
    if not any(heads):
        raise LoadError(f"{path}: {key('attention.head_count')} is 0 in every layer")
    return n_layers, dim, heads, kv, ffn, head_dim


def read_gguf_model(path):
    """A `llama` GGUF, or a `deci` one (per-layer head, kv-head and FFN counts: how save_gguf writes pruned models)."""
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "deci"):
        raise LoadError(f"{path}: GGUF architecture {arch!r} is not supported (llama, deci)")
    g = lambda k, d=None: meta.get(f"{arch}.{k}", d)
    n_layers, dim, heads, kv, ffn, head_dim = gguf_sizes(path, meta, arch, tensors)
    state = {rename(k, GGUF_NAMES): torch.from_numpy(v) for k, v in tensors.items()}
    config = ModelConfig(dim=dim, n_layers=n_layers, n_heads=max(heads), n_kv_heads=max(1, max(kv)),
                         head_dim=head_dim, ffn_dim=max(ffn), vocab_size=state["tok_embeddings.weight"].shape[0],
                         norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=g("rope.freq_base", 10000.0),
                         tie_embeddings="output.weight" not in state, max_seq_len=min(g("context_length", 2048), 8192),
                         kv_of_head=[[h // (n // k) for h in range(n)] if n else [] for n, k in zip(heads, kv)],
                         ffn_dims=list(ffn))
    for i, (n, f) in enumerate(zip(heads, ffn)):  # our model keeps both norms of a layer, used or not
        for norm, used in (("attention_norm", n), ("ffn_norm", f)):
            if not used:
                state.setdefault(f"layers.{i}.{norm}.weight", torch.ones(dim))
    return config, state, meta


def read_checkpoint(path):
    """-> (config, state, tokenizer source, whether q/k rows are in the interleaved RoPE layout)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise LoadError(f"{path}: unknown format (expected a .gguf file or a checkpoint folder)")
        return (*read_gguf_model(path), True)  # the tokenizer is the GGUF's metadata
    if os.path.exists(os.path.join(path, "config.json")):
        tok = os.path.join(path, "tokenizer.gguf")  # an export of a GGUF model keeps its tokenizer so
        return (*read_hf(path), read_gguf(tok, tensors=False)[0] if os.path.exists(tok) else path, False)
    if os.path.exists(os.path.join(path, "params.json")):
        return (*read_meta(path), path, True)
    raise LoadError(f"{path}: no config.json, params.json or .gguf: not a checkpoint")


def load(path, dtype=torch.float32, device="cpu", max_seq_len=None):
    """Loads a checkpoint (HF folder, Meta folder, .gguf file or hub name ORG/NAME[@REV]) -> (Transformer, Tokenizer)."""
    try:
        path = hub.resolve(path)
    except hub.HubError as e:
        raise LoadError(str(e)) from None
    if not os.path.exists(path):
        raise LoadError(f"{path}: no such file or folder (nor a hub name ORG/NAME[@REV])")
    try:
        config, state, tok_source, interleaved = read_checkpoint(path)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LoadError(f"{path}: malformed checkpoint config ({type(e).__name__}: {e})") from None
    except GGUFError as e:
        raise LoadError(str(e)) from None
    if max_seq_len:
        config.max_seq_len = max_seq_len
    for i in range(config.n_layers):  # RoPE layout: interleaved pairs -> rotate-half
        n_q = len(config.kv_of_head[i])
        for w, heads in (("wq", n_q), ("wk", max(config.kv_of_head[i]) + 1 if n_q else 0)):
            key = f"layers.{i}.attention.{w}.weight"
            if interleaved and key in state:
                state[key] = interleaved_to_half(state[key], heads)
    try:
        tokenizer = load_tokenizer(tok_source)
    except (ValueError, OSError) as e:
        raise LoadError(f"{path}: tokenizer: {e}") from None
    tokenizer.source = tok_source  # save() writes it next to an exported model
    if tokenizer.vocab_size > config.vocab_size:
        raise LoadError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
                        f"{config.vocab_size}: tokenizer and weights do not belong together")
    for key in state:  # one tensor at a time: peak memory stays about one copy of the weights
        state[key] = state[key].to(dtype)
    try:
        return build(config, state).to(device), tokenizer
    except ValueError as e:
        raise LoadError(f"{path}: {e}") from None


def check_device(device):
    """--device must name a device this machine has (checked before anything loads)."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device name (cpu, cuda, cuda:1, mps)") from None
    have = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}.get(d.type, 0)
    if (d.index or 0) >= have:
        raise ValueError(f"--device {device}: this machine has {have or 'no'} {d.type} device{'s' * (have != 1)}")


# ----------------------------------------------------------------------------------------------------
# Writing: an exported model in Hugging Face's layout, and a run's adapter

def write_atomic(path, write):
    """write(a temporary file), then rename it onto path: a kill or a full disk mid-write leaves path as it was."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # (a full disk: one line naming the file, and no .tmp left behind)
        raise OSError(f"{path}: not written ({e.strerror or e}); it is as it was") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(model, tokenizer, folder):
    """Writes model.safetensors + config.json (Hugging Face names, rotate-half RoPE) + the tokenizer."""
    check_finite(model.state_dict(), folder)
    os.makedirs(folder, exist_ok=True)
    to_hf = {v: k for k, v in HF_NAMES.items()}
    state = {rename(key, to_hf): value.contiguous() for key, value in model.state_dict().items()}
    write_atomic(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(model.config), f, indent=1)
    src = getattr(tokenizer, "source", None)
    if isinstance(src, dict):  # the tokenizer lived in a GGUF's metadata: keep just that metadata (what we load)
        write_gguf_metadata(os.path.join(folder, "tokenizer.gguf"), gguf_tokenizer(tokenizer))
        if tokenizer.kind == "bpe":  # and the same vocabulary as Hugging Face files, for AutoTokenizer
            for name, content in hf_tokenizer_files(tokenizer).items():
                with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                    json.dump(content, f, ensure_ascii=False, indent=1)
    elif src is not None:
        src_dir = src if os.path.isdir(src) else os.path.dirname(src)
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(src_dir, name)) and os.path.abspath(src_dir) != os.path.abspath(folder):
                shutil.copy(os.path.join(src_dir, name), folder)


GGUF_OUT = {v: k for k, v in GGUF_NAMES.items()}


def half_to_interleaved(w, n_heads):
    """The inverse of interleaved_to_half: our rotate-half q/k rows in llama.cpp's interleaved layout."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def save_gguf(model, tokenizer, path, qtype="F16"):
    """Writes a .gguf file llama.cpp runs: an intact model as architecture `llama`; a pruned one as `deci`
    (written for NVIDIA's pruned Nemotron models), whose per-layer arrays give each layer its own head, kv-head
    and FFN counts. Norms stay F32. Q8_0 and Q4_0 quantize rows in blocks of 32, so the model is first padded
    with zero units to multiples of 32 (model.pad_model: exact)."""
    qtype = qtype.upper()
    if qtype not in FILE_TYPE:
        raise ValueError(f"GGUF type {qtype}: choose from {', '.join(FILE_TYPE)}")
    check_finite(model.state_dict(), path)
    m = pad_model(model, 32 if qtype in ("Q8_0", "Q4_0") else 1)  # also puts every layer in the fixed GQA layout
    c, sd, hd = m.config, dict(m.state_dict()), m.config.head_dim
    heads, ffn = [len(k) for k in c.kv_of_head], list(c.ffn_dims)
    kv = [max(k) + 1 if k else 0 for k in c.kv_of_head]
    zeros = lambda *shape: torch.zeros(shape)
    # Two llama.cpp rules a pruned model can break, met with zero units (exact): the head size is read from
    # layer 0, so it needs a head; and deci.cpp skips a layer with no FFN whole, its attention included.
    if not heads[0]:
        heads[0] = kv[0] = 1
        sd.update({f"layers.0.attention.{w}.weight": zeros(hd, c.dim) for w in ("wq", "wk", "wv")})
        sd["layers.0.attention.wo.weight"] = zeros(c.dim, hd)
    for i in range(c.n_layers):
        if heads[i] and not ffn[i]:
            ffn[i] = 32
            sd.update({f"layers.{i}.feed_forward.{w}.weight": zeros(32, c.dim) for w in ("w1", "w3")})
            sd[f"layers.{i}.feed_forward.w2.weight"] = zeros(c.dim, 32)
    uniform = len({*heads}) == len({*kv}) == len({*ffn}) == 1 and heads[0] and ffn[0]
    a = "llama" if uniform else "deci"
    per_layer = (lambda v: v[0]) if uniform else list
    meta = {"general.architecture": a, "general.name": Path(path).stem, "general.file_type": FILE_TYPE[qtype],
            f"{a}.vocab_size": c.vocab_size, f"{a}.context_length": c.max_seq_len, f"{a}.embedding_length": c.dim,
            f"{a}.block_count": c.n_layers, f"{a}.feed_forward_length": per_layer(ffn),
            f"{a}.attention.head_count": per_layer(heads), f"{a}.attention.head_count_kv": per_layer(kv),
            f"{a}.attention.key_length": hd, f"{a}.attention.value_length": hd, f"{a}.rope.dimension_count": hd,
            f"{a}.rope.freq_base": float(c.rope_theta), f"{a}.attention.layer_norm_rms_epsilon": float(c.norm_eps),
            **gguf_tokenizer(tokenizer, c.vocab_size)}
    tensors = []
    for key, w in sd.items():
        i = int(key.split(".")[1]) if key.startswith("layers.") else None
        if i is not None and (("attention" in key and not heads[i]) or ("ffn_norm" in key or "feed_forward" in key) and not ffn[i]):
            continue  # llama.cpp makes no tensors for a layer's missing attention or FFN
        if key.endswith(("wq.weight", "wk.weight")):
            w = half_to_interleaved(w, w.shape[0] // hd)
        kind = "F32" if w.dim() == 1 else qtype if qtype in ("F32", "F16", "BF16") or w.shape[1] % 32 == 0 else "F16"
        tensors.append((rename(key, GGUF_OUT), list(w.shape), kind, lambda w=w, kind=kind: quantize(w.float().numpy(), kind)))
    write_gguf(path, meta, tensors)


def load_adapter(run, model):
    """-> the adapter dict of a run folder, checked against the model's shapes."""
    path = os.path.join(run, "adapter.safetensors")
    if not os.path.exists(path):
        raise LoadError(f"{path}: not found (is {run} a folder written by nute.py?)")
    try:
        adapter = load_file(path)
    except Exception as e:  # safetensors raises its own error type for a torn or foreign file
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from None
    if bad := [k for k, v in adapter.items() if not torch.isfinite(v).all()]:
        raise LoadError(f"{path}: {bad[0]} holds NaN or inf (a diverged run)")
    want = mask_shapes(model.config)
    params = dict(model.named_parameters())
    for key, t in adapter.items():
        if key.endswith((".lora_A", ".lora_B")):  # A [r, in], B [out, r] of the weight [out, in]
            name = key[:-len(".lora_A")]
            w, A = params.get(name + ".weight"), adapter.get(name + ".lora_A")
            if w is None or A is None or name + ".lora_B" not in adapter:
                raise LoadError(f"{path}: {key} has no weight of this model or no A/B partner")
            want[key] = (A.shape[0], w.shape[1]) if key.endswith("A") else (w.shape[0], A.shape[0])
        elif key not in want and key != "lora_scale":
            raise LoadError(f"{path}: unexpected tensor {key}")
        if key in want and tuple(t.shape) != want[key]:
            raise LoadError(f"{path}: {key} has shape {list(t.shape)}, this model needs {list(want[key])}: "
                            "the run was made from another base checkpoint (pass it with --ckpt)")
    if any(k.endswith(".lora_A") for k in adapter) and "lora_scale" not in adapter:
        raise LoadError(f"{path}: LoRA tensors but no lora_scale")
    device = model.tok_embeddings.weight.device
    adapter = {k: v.to(device) for k, v in adapter.items()}
    if "lora_scale" in adapter:
        adapter["lora_scale"] = float(adapter["lora_scale"])
    return adapter


def run_base(run):
    """-> the base checkpoint a nute.py run pruned (its settings.json), None if the run has no settings."""
    settings = os.path.join(run, "settings.json")
    if not os.path.exists(settings):
        return None
    try:
        with open(settings) as f:
            return json.load(f).get("ckpt")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{settings}: corrupt (pass the base checkpoint with --ckpt)") from None


def check_finite(tensors, where):
    """Nothing with NaN or inf is ever written: a diverged run fails here instead of saving garbage."""
    for k, v in tensors.items():
        if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{where}: not written, {k} holds NaN or inf")


# ----------------------------------------------------------------------------------------------------
# The command line: any checkpoint, or the pruned model of a nute.py run, written for another runtime

def main(argv=None):
    p = argparse.ArgumentParser(description="Write a checkpoint, or the pruned model of a nute.py run, as a GGUF "
                                "file for llama.cpp (--out NAME.gguf) or a Hugging Face folder (--out FOLDER).")
    p.add_argument("--ckpt", help="the base checkpoint (default: the run's)")
    p.add_argument("--run", help="a finished nute.py run: its masks and LoRA are cut into the weights (model.slice_model)")
    p.add_argument("--out", required=True, help="NAME.gguf, or a folder for model.safetensors + config.json + tokenizer")
    p.add_argument("--type", help="GGUF tensor type: F32, F16 (default), BF16, Q8_0 or Q4_0 (norms stay F32)")
    p.add_argument("--uniform", action="store_true", help="Hugging Face folder: pad every layer to the same sizes "
                   "with zero units (exact), so that AutoModelForCausalLM, vLLM and TGI load it")
    args = p.parse_args(argv)
    gguf, qtype = args.out.endswith(".gguf"), (args.type or "F16").upper()
    if gguf and qtype not in FILE_TYPE or args.uniform and gguf or args.type and not gguf:
        raise ValueError(f"--type (for a .gguf --out) is one of {', '.join(FILE_TYPE)}; --uniform is for a Hugging "
                         "Face folder")
    if os.path.isfile(args.out) or os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out}: already there, and a result is never overwritten (another name, or delete it)")
    if args.run and not os.path.isfile(os.path.join(args.run, "adapter.safetensors")):
        raise ValueError(f"--run {args.run}: no adapter.safetensors there (not a finished nute.py run)")
    ckpt = args.ckpt or (run_base(args.run) if args.run else None)
    if ckpt is None:
        raise ValueError("--ckpt: which checkpoint? (a run's settings.json names it when --run is given)")
    model, tok = load(ckpt)
    if args.run:
        model = slice_model(model, load_adapter(args.run, model))
    if gguf:
        save_gguf(model, tok, args.out, qtype)
    else:
        save(pad_model(model, uniform=True) if args.uniform else model, tok, args.out)
    c = model.config
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()):,} parameters, hidden dim {c.dim}, heads "
          f"{[len(k) for k in c.kv_of_head]}, FFN widths {c.ffn_dims}")


if __name__ == "__main__":
    try:
        main()
    except (LoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
