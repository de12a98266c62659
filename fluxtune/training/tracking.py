"""Experiment tracking: W&B, TensorBoard or nothing, behind one small interface.

    from fluxtune.training.tracking import make_tracker, read_run_id

    tracker = make_tracker("wandb", project="my-loras", run_name="sks-dog", tags=["flux1-dev"],
                           config=config_dict, output_dir=out, resume_id=read_run_id(out),
                           enabled=accelerator.is_main_process)
    tracker.log({"loss": 0.12, "lr": 1e-4}, step=10)
    tracker.log_images("samples", images, captions, step=10)
    tracker.log_artifact(out / "lora", name="sks-dog", metadata={"step": 10})
    tracker.finish()

The config is passed through `redact()` first, so keys such as `hf_token` or `api_key` never reach
the tracker. W&B without network: `WANDB_MODE=offline`; the run lands in
`$WANDB_DIR/wandb/offline-run-*/` (default: `output_dir`) and `wandb sync <that folder>` uploads it.
TensorBoard: `tensorboard --logdir <output_dir>/tensorboard`.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fluxtune.errors import UserError

if TYPE_CHECKING:
    from PIL.Image import Image

BACKENDS = ("wandb", "tensorboard", "none")
RUN_ID_FILE = "wandb_run_id.txt"
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "auth", "authorization",
                 "credential", "credentials"}


class TrackingError(UserError):
    """A tracking backend that is unknown or not installed."""


class Tracker(Protocol):
    run_id: str | None  # the W&B run id; None for backends without one

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_images(self, key: str, images: list[Image], captions: list[str], step: int) -> None: ...
    def log_artifact(self, path: str | Path, name: str, metadata: dict) -> None: ...
    def finish(self) -> None: ...


def _is_secret(key: str) -> bool:
    # Word by word, so `hf_token`, `wandbKey` and `API-KEY` match but `max_sequence_length`,
    # `num_tokens` and `tokenizer` do not.
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    return any(w in _SECRET_WORDS for w in re.split(r"[^a-z0-9]+", words))


def redact(config: dict) -> dict:
    """A deep copy of `config` with every secret-looking key's value replaced by "***".

    String values equal to a secret environment variable (WANDB_API_KEY, HF_TOKEN, ...) are
    replaced too, whatever their key is called.
    """
    env_secrets = {v for k, v in os.environ.items() if _is_secret(k) and len(v) >= 8}

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: "***" if _is_secret(str(k)) else walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v) for v in value)
        if isinstance(value, str) and value in env_secrets:
            return "***"
        return copy.deepcopy(value)

    return walk(config)


def read_run_id(output_dir: str | Path) -> str | None:
    """The W&B run id a previous run in `output_dir` wrote, so a resumed run continues it."""
    path = Path(output_dir) / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


class NoTracker:
    """Logs nothing: the `none` backend and every non-main process."""

    run_id: str | None = None

    def log(self, metrics, step):
        pass

    def log_images(self, key, images, captions, step):
        pass

    def log_artifact(self, path, name, metadata):
        pass

    def finish(self):
        pass


class WandbTracker:
    def __init__(self, *, project, run_name, tags, config, output_dir, resume_id):
        try:
            import wandb
        except ImportError:
            raise TrackingError("logging to W&B needs wandb: pip install 'fluxtune[wandb]'") from None
        self._wandb = wandb
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        # WANDB_DIR is read here because W&B reads its environment once per process.
        # quiet keeps the run URL and the offline `wandb sync` hint, drops the banner and summary.
        self._run = wandb.init(
            project=project, name=run_name, tags=list(tags), config=config,
            dir=os.environ.get("WANDB_DIR") or str(output_dir),
            id=resume_id, resume="allow" if resume_id else None,
            settings=wandb.Settings(quiet=True),
        )
        self.run_id = self._run.id
        (output_dir / RUN_ID_FILE).write_text(self.run_id + "\n")

    def log(self, metrics, step):
        self._run.log(dict(metrics), step=step)

    def log_images(self, key, images, captions, step):
        media = [self._wandb.Image(img, caption=c) for img, c in zip(images, captions, strict=True)]
        self._run.log({key: media}, step=step)

    def log_artifact(self, path, name, metadata):
        path = Path(path)
        artifact = self._wandb.Artifact(name, type="lora", metadata=dict(metadata))
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact)

    def finish(self):
        self._run.finish()


class TensorBoardTracker:
    run_id: str | None = None

    def __init__(self, *, config, output_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackingError("logging to TensorBoard needs tensorboard: pip install tensorboard") from None
        self.log_dir = Path(output_dir) / "tensorboard"
        self._writer = SummaryWriter(str(self.log_dir))
        self._writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, metrics, step):
        for name, value in metrics.items():
            self._writer.add_scalar(name, float(value), global_step=step)

    def log_images(self, key, images, captions, step):
        import numpy as np

        for i, (img, caption) in enumerate(zip(images, captions, strict=True)):
            self._writer.add_image(f"{key}/{i}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
            self._writer.add_text(f"{key}/{i}/caption", caption, step)

    def log_artifact(self, path, name, metadata):
        # TensorBoard has no artifacts: note where the file is, so the run folder still points to it.
        record = {"name": name, "path": str(Path(path).resolve()), "metadata": metadata}
        with open(self.log_dir / "artifacts.jsonl", "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def finish(self):
        self._writer.close()


def make_tracker(backend: str, *, project: str, run_name: str | None, tags: list[str], config: dict,
                 output_dir: str | Path, resume_id: str | None = None, enabled: bool = True) -> Tracker:
    """The tracker for `backend`; `enabled=False` (non-main processes) always gives `NoTracker`."""
    if backend not in BACKENDS:
        raise TrackingError(f"unknown tracking backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not enabled or backend == "none":
        return NoTracker()
    if backend == "wandb":
        return WandbTracker(project=project, run_name=run_name, tags=tags, config=redact(config),
                            output_dir=output_dir, resume_id=resume_id)
    return TensorBoardTracker(config=redact(config), output_dir=output_dir)
