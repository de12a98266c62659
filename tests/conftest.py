"""Shared test setup: offline hub, tiny pipelines and a small photo dataset, built once per session.

Everything runs on CPU with no network: the tiny models are written with `save_pretrained` and
loaded back through the same `from_pretrained` path a real checkpoint takes.
"""

import os
import tempfile

# huggingface_hub reads these once, at import: set them before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="fluxtune-test-hf-")
os.environ["WANDB_MODE"] = "offline"
os.environ["FLUXTUNE_CACHE"] = tempfile.mkdtemp(prefix="fluxtune-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

from data_tools.demo_photos import write_demo_photos  # noqa: E402
from fluxtune.models.tiny import make_tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Ops this small are dominated by thread hand-offs; one thread is several times faster on 2 cores.
    torch.set_num_threads(1)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Every W&B folder under tmp_path, nothing sent anywhere; returns WANDB_DIR."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in [("WANDB_DIR", "wandb_dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_CACHE_DIR", "cache"), ("WANDB_ARTIFACT_DIR", "artifacts")]:
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path / "wandb_dir"


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Three real photos (CC0, bundled with scikit-image) with captions."""
    folder = tmp_path_factory.mktemp("photos")
    write_demo_photos(folder, trigger="sks", names=["astronaut", "chelsea", "coffee"])
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind -> folder of a tiny pipeline, made on first use."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = make_tiny(kind, root / kind)
        return made[kind]

    return get
