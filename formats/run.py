"""A run folder: settings.json (a run's settings and run id), a lock while a process writes it, log.jsonl (a row a
step), checkpoint.pt (everything a resume needs: tensors, numbers and strings only), adapter.safetensors (the
result), model/ and model.gguf (the pruned model). Every file is written whole or not at all (write_atomic)."""
import fcntl
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from formats.checkpoint import LoadError, check_finite, save, save_gguf, write_atomic
from formats.layout import pad_model
from model import slice_model


def save_adapter(adapter, run):
    """Writes a run's masks + LoRA (+ lora_scale) as run/adapter.safetensors, fp32 on the CPU."""
    tensors = {k: torch.as_tensor(v).detach().float().cpu().contiguous() for k, v in adapter.items()}
    check_finite(tensors, os.path.join(run, "adapter.safetensors"))
    write_atomic(os.path.join(run, "adapter.safetensors"), lambda tmp: save_file(tensors, tmp))


def export(model, tok, adapter, out, dtype, gguf=None):
    """The run's pruned model (model.slice_model) written as out/model, and with `gguf` (a tensor type) out/model.gguf
    for llama.cpp -> the model. Zero units (exact) give it faster shapes: the GQA layout, 16-bit widths in 32s
    (lab/NOTEBOOK.md, "Pruned vs dense decoding")."""
    small = pad_model(slice_model(model, adapter), 1 if dtype == torch.float32 else 32).to(dtype)
    save(small, tok, Path(out) / "model")
    if gguf:  # (python -m formats.checkpoint writes one from any finished run too)
        save_gguf(small, tok, Path(out) / "model.gguf", gguf)
    return small


def check_run_folder(out, resume):
    """Cheap checks before anything is loaded; writes nothing -> the saved settings of the run to resume.
    A folder belongs to the run whose settings.json (its settings and run id) is in it: a new run needs a
    missing or empty folder, so a finished or foreign run is never overwritten."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    if resume:
        try:
            saved = json.loads((out / "settings.json").read_text())
        except FileNotFoundError:
            raise ValueError(f"--resume: {out} holds no run (no settings.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = None
        if not isinstance(saved, dict):
            raise ValueError(f"--resume: {out / 'settings.json'} is corrupt")
        return saved
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty: add --resume to continue its run, or choose another --out")
    parent = next(p for p in out.absolute().parents if p.exists())  # the folder mkdir would write into
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot create it in {parent}")


def lock_run_folder(out):
    """An exclusive lock on the folder itself -> its file descriptor (closing it, or the process ending, unlocks)."""
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"--out {out}: another process is writing this run folder now") from None
    return fd


@contextmanager
def open_run(out, settings, resume):
    """`with open_run(...) as (folder, run_id)`: locks the folder for the block, so one process writes it at a time;
    checks it (above) and that a resumed run has the same settings; records them with a new run id for a new run."""
    out = Path(out)
    check_run_folder(out, resume)  # before creating anything
    out.mkdir(parents=True, exist_ok=True)
    fd = lock_run_folder(out)
    try:
        saved = check_run_folder(out, resume)  # again under the lock: another run may have started meanwhile
        if resume:
            diff = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in settings.items() if saved.get(k) != v]
            if diff:
                raise ValueError(f"--resume: {out} was run with other settings: " + ", ".join(diff))
            run_id = saved.get("run_id")  # None for a run made before run ids
        else:
            run_id = uuid.uuid4().hex
            (out / "settings.json").write_text(json.dumps({**settings, "run_id": run_id}, indent=1))
        yield out, run_id
    finally:
        os.close(fd)


def save_run_state(out, state):
    write_atomic(Path(out) / "checkpoint.pt", lambda tmp: torch.save(state, tmp))  # the previous one stays till then


def load_run_state(out, run_id, device, trim_log=True):
    """-> the saved training state, or None when the run died before its first checkpoint. The log keeps
    the rows up to the checkpoint's step (a resume redoes the rest); a line torn by a crash is dropped."""
    path, log = Path(out) / "checkpoint.pt", Path(out) / "log.jsonl"
    state = None
    if path.exists():
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # torn or foreign: torch raises several types
            raise LoadError(f"{path}: cannot be read ({type(e).__name__}); delete it to restart the run") from None
        if not isinstance(state, dict) or state.get("run_id") != run_id:
            raise LoadError(f"{path}: belongs to another run than {Path(out) / 'settings.json'}")
    if not trim_log:
        return state
    rows, keep = log.read_text().splitlines() if log.exists() else [], []
    for i, row in enumerate(rows):
        try:
            step = json.loads(row)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if i < len(rows) - 1:  # only the last line can be torn by a crash mid-write; it is dropped
                raise LoadError(f"{log}: line {i + 1} is corrupt") from None
            continue
        if state and step <= state["step"]:
            keep.append(row)
    write_atomic(log, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in keep)))
    return state
