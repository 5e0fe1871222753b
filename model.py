"""A from-scratch LLaMA with NutePrune's masks and LoRA built in, a KV cache, and checkpoint loaders.

One set of frozen base weights runs the intact model, the masked student, any teacher snapshot and
(after export) a physically smaller model. Masks and LoRA never live inside the model: they arrive
with each forward as an *adapter*, a flat dict of tensors (see `Transformer.forward`).
"""
import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class LoadError(Exception):
    """A checkpoint or tokenizer that cannot be loaded; the command line prints it as one line."""


# ----------------------------------------------------------------------------------------------------
# GGUF: a ~80-line reader for the formats real checkpoints use (F32, F16, BF16, Q8_0, Q4_0, Q4_1)

GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}


def read_gguf(path, tensors=True):
    """Returns (metadata dict, {name: np.ndarray float32 in PyTorch [out, in] order})."""
    with open(path, "rb") as f:
        buf = f.read()
    if buf[:4] != b"GGUF":
        raise LoadError(f"{path}: not a GGUF file")
    pos = 4

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return vals[0]

    def string():
        nonlocal pos
        n = take("<Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8", errors="replace")

    def value(t):
        nonlocal pos
        if t == GGUF_STRING:
            return string()
        if t == GGUF_ARRAY:
            et, n = take("<I"), take("<Q")
            if et in GGUF_SCALAR:  # read numeric arrays in one go
                dt = np.dtype(GGUF_SCALAR[et])
                arr = np.frombuffer(buf, dt, n, pos)
                pos += n * dt.itemsize
                return arr.tolist()
            return [value(et) for _ in range(n)]
        return take(GGUF_SCALAR[t])

    try:
        version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        if version not in (2, 3):
            raise LoadError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            shape = [take("<Q") for _ in range(take("<I"))]
            infos.append((name, shape, take("<I"), take("<Q")))
    except struct.error:
        raise LoadError(f"{path}: GGUF header is truncated") from None
    if not tensors:
        return meta, {}
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    out = {}
    for name, shape, t, offset in infos:
        if t not in GGML_TYPES:
            raise LoadError(f"{path}: tensor {name} has ggml type {t}; supported: "
                            + ", ".join(v[0] for v in GGML_TYPES.values()))
        kind, block, nbytes = GGML_TYPES[t]
        n = math.prod(shape)
        size = n // block * nbytes
        if start + offset + size > len(buf):
            raise LoadError(f"{path}: file is truncated (tensor {name} runs past the end)")
        raw = np.frombuffer(buf, np.uint8, size, start + offset)
        out[name] = dequantize(raw, kind, n).reshape(shape[::-1])  # GGUF lists dims fastest-first
    return meta, out


def dequantize(raw, kind, n):
    if kind == "F32":
        return raw.view(np.float32).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32)
    if kind == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(n // 32, -1)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1] scale
    if kind == "Q8_0":
        return (d * blocks[:, 2:].view(np.int8)).reshape(-1)
    qs = blocks[:, -16:]  # 16 bytes: low nibbles are elements 0..15, high nibbles 16..31
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    if kind == "Q4_0":
        return (d * (q - 8)).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # Q4_1: x = d * q + m
    return (d * q + m).reshape(-1)
