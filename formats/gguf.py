"""GGUF, the file format of llama.cpp, both ways: a reader for the tensor types real checkpoints use (F32,
F16, BF16, Q8_0, Q4_0, Q4_1), ggml's reference quantizers, and a writer. Which tensors and metadata keys
make a LLaMA model is formats/checkpoint.py's business (read_gguf_model, save_gguf); this file is only the format.

    meta, tensors = read_gguf("model.gguf")           # tensors: {name: float32 array, PyTorch [out, in] order}
    write_gguf("out.gguf", meta, [(name, shape, "Q8_0", quantize(x, "Q8_0"))])
"""
import math
import os
import struct

import numpy as np
import torch


class GGUFError(ValueError):
    """A file that is not GGUF, or a truncated, corrupt or unsupported one."""



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
        raise GGUFError(f"{path}: not a GGUF file")
    try:
        meta, infos, pos = read_gguf_header(buf)
    except (struct.error, ValueError, KeyError, OverflowError):  # a cut, an unknown type, a count past 2^63
        raise GGUFError(f"{path}: GGUF header is truncated or corrupt") from None
    if meta is None:
        raise GGUFError(f"{path}: GGUF version {infos} is not supported (2 or 3)")
    if not tensors:
        return meta, {}
    align = meta.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1):  # llama.cpp asks for a power of two too
        raise GGUFError(f"{path}: general.alignment is {align!r:.40}, not a power of two")
    start = (pos + align - 1) // align * align
    out = {}
    for name, shape, t, offset in infos:
        if t not in GGML_TYPES:
            raise GGUFError(f"{path}: tensor {name} has ggml type {t}; supported: "
                            + ", ".join(v[0] for v in GGML_TYPES.values()))
        kind, block, nbytes = GGML_TYPES[t]
        n = math.prod(shape)
        size = n // block * nbytes
        if start + offset + size > len(buf):
            raise GGUFError(f"{path}: file is truncated (tensor {name} runs past the end)")
        raw = np.frombuffer(buf, np.uint8, size, start + offset)
        out[name] = dequantize(raw, kind, n).reshape(shape[::-1])  # GGUF lists dims fastest-first
    return meta, out


def read_gguf_header(buf):
    """-> (metadata, [(tensor name, shape, ggml type, offset)], where the header ends);
    (None, version, 0) for a version we do not read."""
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

    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    if version not in (2, 3):
        return None, version, 0
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        shape = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, shape, take("<I"), take("<Q")))
    return meta, infos, pos


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


def quantize(x, kind):
    """x float32 [rows, n] -> the bytes ggml stores (its reference quantizers, quantize_row_*_ref); blocks of 32
    along each row for Q8_0 (d = max|x| / 127) and Q4_0 (d = the largest-magnitude value / -8)."""
    if kind == "F32":
        return x.astype(np.float32).tobytes()
    if kind in ("F16", "BF16"):  # round to nearest even, as ggml does
        return torch.from_numpy(x).to(torch.float16 if kind == "F16" else torch.bfloat16).view(torch.int16).numpy().tobytes()
    b = x.reshape(-1, 32).astype(np.float32)
    inv = lambda d: np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    if kind == "Q8_0":
        d = np.abs(b).max(1, keepdims=True) / 127
        v = b * inv(d)
        q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)  # C's roundf: half away from zero
        return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], 1).tobytes()
    if kind == "Q4_0":
        d = b[np.arange(len(b)), np.abs(b).argmax(1)][:, None] / -8
        q = np.minimum(15, np.trunc(b * inv(d) + 8.5)).astype(np.uint8)
        return np.concatenate([d.astype(np.float16).view(np.uint8), q[:, :16] | (q[:, 16:] << 4)], 1).tobytes()
    raise ValueError(f"GGUF type {kind}: choose from F32, F16, BF16, Q8_0, Q4_0")


GGML_ID = {name: t for t, (name, _, _) in GGML_TYPES.items()}
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}  # general.file_type, llama.cpp's ftype


def gguf_value(v):
    """One metadata value with its type tag, in the types llama.cpp asks for: str, bool, int -> uint32,
    float -> float32; lists of str, float32 or int32."""
    if isinstance(v, str):
        b = v.encode()
        return struct.pack("<IQ", GGUF_STRING, len(b)) + b
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v) if 0 <= v < 2 ** 32 else struct.pack("<Iq", 11, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if v and isinstance(v[0], str):
        return struct.pack("<IIQ", GGUF_ARRAY, GGUF_STRING, len(v)) + b"".join(gguf_value(x)[4:] for x in v)
    kind, dt = (6, "<f4") if any(isinstance(x, float) for x in v) else (5, "<i4")
    return struct.pack("<IIQ", GGUF_ARRAY, kind, len(v)) + np.asarray(v, dt).tobytes()


def write_gguf(path, meta, tensors):
    """meta {key: value}; tensors [(name, shape in PyTorch order, ggml type name, raw bytes or a function that
    returns them)]. The data is made and written one tensor at a time into path + ".part", renamed when complete."""
    head = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for k, v in meta.items():
        head += [struct.pack("<Q", len(k.encode())), k.encode(), gguf_value(v)]
    offset = 0
    for name, shape, kind, raw in tensors:
        dims = struct.pack(f"<{len(shape)}Q", *shape[::-1])  # GGUF lists the fastest dim first
        head += [struct.pack("<Q", len(name.encode())), name.encode(), struct.pack("<I", len(shape)), dims,
                 struct.pack("<IQ", GGML_ID[kind], offset)]
        _, block, nbytes = GGML_TYPES[GGML_ID[kind]]
        offset += -(-math.prod(shape) // block * nbytes // 32) * 32
    head = b"".join(head)
    try:
        with open(str(path) + ".part", "wb") as f:
            f.write(head + b"\0" * (-len(head) % 32))
            for _, _, _, raw in tensors:
                f.write(raw() if callable(raw) else raw)
                f.write(b"\0" * (-f.tell() % 32))
        os.replace(str(path) + ".part", path)
    except OSError as e:  # a full disk: one line naming the file, and no .part left behind
        if os.path.exists(str(path) + ".part"):
            os.remove(str(path) + ".part")
        raise OSError(f"{path}: not written ({e.strerror or e})") from None


def write_gguf_metadata(path, meta):
    """A GGUF file with metadata and no tensors (how llama.cpp ships bare vocabularies)."""
    write_gguf(path, meta, [])
