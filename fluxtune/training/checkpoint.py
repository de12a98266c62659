"""Training-state checkpoints: everything needed to continue a run bit for bit.

    save_state(out / "state", step, tensors, meta, keep=3)     # atomic: a kill never leaves a "valid" half
    found = latest_state(out / "state")                       # newest checkpoint that verifies, or None
    tensors, meta = load_state(found)

A checkpoint is a folder `step-NNNNNN/` holding `tensors.safetensors` (LoRA weights, optimizer
moments, EMA, RNG states), `state.json` (step, data position, scheduler, optimizer settings, run
id) and `manifest.json` (sha256 of both, written last). It is written into a temporary folder,
fsynced and renamed into place; `latest` then names it. Only safetensors and JSON are ever read
back: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fluxtune.errors import UserError

log = logging.getLogger("fluxtune")

TENSORS, META, MANIFEST, LATEST = "tensors.safetensors", "state.json", "manifest.json", "latest"


class CheckpointError(UserError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


def save_state(root: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int) -> Path:
    """Write checkpoint `step` under `root`; keep the newest `keep`. On failure nothing valid changes."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp, final, old = root / f".tmp-{name}", root / name, root / f".old-{name}"
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # from a run killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps({**meta, "step": step}), encoding="utf-8")
        manifest = {f: _sha256(tmp / f) for f in (TENSORS, META)}
        (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        for f in (TENSORS, META, MANIFEST):
            _fsync(tmp / f)
        _fsync(tmp)
        if final.exists():  # a resumed run passing this step again: swap, never delete first
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
        shutil.rmtree(old, ignore_errors=True)
        _write_text_atomic(root / LATEST, name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_state(root, warn=False)
        raise CheckpointError(
            f"writing checkpoint {final} failed ({e.strerror or e}); "
            + (f"the previous checkpoint {previous} is intact. " if previous else "no earlier checkpoint exists. ")
            + f"Free space in {root} and resume with train.resume=latest."
        ) from None
    for stale in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        # Renamed first: a kill mid-delete leaves a hidden leftover, never a half "step-" folder.
        doomed = root / f".old-{stale.name}"
        os.replace(stale, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def verify(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint, else what is wrong with it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable manifest (an interrupted write?)"
    for name, digest in manifest.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_state(root: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint under `root` that verifies; a broken newer one is skipped with a warning."""
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    pointer = root / LATEST
    if pointer.is_file():  # `latest` first, though a newer complete folder also counts
        named = root / pointer.read_text(encoding="utf-8").strip()
        candidates = sorted(set(candidates) | ({named} if named.is_dir() else set()), reverse=True)
    for folder in candidates:
        problem = verify(folder)
        if problem is None:
            return folder
        if warn:
            log.warning("checkpoint %s is unusable (%s); trying the previous one", folder, problem)
    return None


def load_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    problem = verify(folder)
    if problem:
        raise CheckpointError(f"checkpoint {folder} is unusable: {problem}")
    return load_file(folder / TENSORS), json.loads((folder / META).read_text(encoding="utf-8"))


def read_meta(folder: Path) -> dict:
    """The JSON half of a checkpoint that `resolve_resume` has already verified (no tensors read)."""
    return json.loads((folder / META).read_text(encoding="utf-8"))


def resolve_resume(setting: str | None, root: Path) -> Path | None:
    """train.resume -> the checkpoint folder to load, or None to start fresh."""
    if setting is None:
        return None
    if setting == "latest":
        found = latest_state(root)
        if found is None:
            log.info("train.resume=latest: no checkpoint in %s yet; starting from step 0", root)
        return found
    folder = Path(setting)
    if folder.is_dir() and (folder / MANIFEST).exists():
        problem = verify(folder)  # now, with a clear error, before any model loads
        if problem:
            raise CheckpointError(f"train.resume: checkpoint {folder} is unusable: {problem}")
        return folder
    found = latest_state(folder) if folder.is_dir() else None
    if found is None:
        raise CheckpointError(f"train.resume: {setting} is not a checkpoint folder nor a folder holding one")
    return found


# ----------------------------------------------------------------- optimizer and RNG state, no pickle


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors, JSON): per-parameter tensors go to safetensors.

    Per-parameter state may nest (bitsandbytes wraps its quantization state in a dict): nested
    keys join with dots. A tensor shared by several parameters (bitsandbytes' quantization maps)
    is copied for each, as safetensors refuses tensors that share memory.
    """
    tensors, scalars, seen = {}, {}, set()

    def add(path: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{path}.{key}", inner)
        elif torch.is_tensor(value):
            shared = value.untyped_storage().data_ptr() in seen
            seen.add(value.untyped_storage().data_ptr())
            tensors[f"optim.{path}"] = value.clone() if shared else value
        else:
            scalars[path] = value

    for idx, per_param in state["state"].items():
        add(str(idx), per_param)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of `optimizer_to_flat` (state keys hold no dots: a dot means nesting)."""
    state: dict[int, dict] = {}

    def put(path: str, value) -> None:
        idx, *keys = path.split(".")
        node = state.setdefault(int(idx), {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    for name, value in tensors.items():
        if name.startswith("optim."):
            put(name.removeprefix("optim."), value)
    for name, value in meta["scalars"].items():
        put(name, value)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    import random

    import numpy as np

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(internal), gauss_next]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------------------------ preemption

EXIT_KILLED = 130


class StopOnSignal:
    """SIGTERM or SIGINT asks the loop to stop after the current step (`requested`); a second one
    exits at once. Every write is atomic, so an exit at any moment corrupts nothing."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        import signal

        name = signal.Signals(signum).name
        if self.requested:
            log.warning("second %s: exiting now; the last checkpoint is intact", name)
            os._exit(EXIT_KILLED)
        self.requested = name
        log.warning("%s received: finishing this step, then writing a checkpoint (send again to exit now)", name)

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


MIN_FREE_BYTES = 512 * 2**20


def check_output_dir(out: Path) -> None:
    """Before any model loads: the output folder must be writable and have room for checkpoints."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {out}: cannot write there ({e.strerror or e}); choose another output_dir") from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"output_dir {out}: only {free / 2**20:.0f} MiB free; checkpoints need at least "
                        f"{MIN_FREE_BYTES / 2**20:.0f} MiB. Free some space or choose another output_dir")
