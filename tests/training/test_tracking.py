"""Trackers write what they are given, where a user will look for it, with secrets redacted.

Run: pytest -q tests/test_tracking.py   (offline: W&B runs with WANDB_MODE=offline)
"""

import json
import sys

import pytest
from PIL import Image

from fluxtune.errors import UserError
from fluxtune.training.tracking import make_tracker, read_run_id, redact
from wandb_files import history_rows, one_run_dir, run_dirs, settled_records

CONFIG = {
    "model": {"name": "flux1-dev", "max_sequence_length": 512, "text_encoder_out_layers": [10, 20]},
    "train": {"lr": 1e-4, "steps": 30},
    "hub": {"hf_token": "hf_SECRETVALUE1", "push": False},
    "logging": {"wandb": {"api_key": "SECRETVALUE2", "project": "p"}},
}
SECRETS = ("hf_SECRETVALUE1", "SECRETVALUE2")


def test_wandb_offline_run_holds_history_images_config_and_artifact(offline_wandb, tmp_path):
    out = tmp_path / "out"
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"not really a lora")
    tracker = make_tracker("wandb", project="fluxtune-test", run_name="t1", tags=["tiny"], config=CONFIG,
                           output_dir=out)
    losses = {0: 1.5, 10: 0.75, 20: 0.5}
    for step, loss in losses.items():
        tracker.log({"loss": loss, "lr": 1e-4}, step=step)
    images = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    tracker.log_images("samples", images, ["a red square", "a blue square"], step=20)
    tracker.log_artifact(lora, name="t1-lora", metadata={"step": 20, "rank": 4})
    tracker.finish()

    assert read_run_id(out) == tracker.run_id
    run_dir = one_run_dir(offline_wandb, tracker.run_id)
    records = settled_records(run_dir / f"run-{tracker.run_id}.wandb")
    by_type = {}
    for r in records:
        by_type.setdefault(r.WhichOneof("record_type"), []).append(r)

    # (a) every loss at its step; the images logged at step 20 share that step's row
    rows = history_rows(records)
    assert {row["_step"]: row["loss"] for row in rows} == losses
    (last,) = [row for row in rows if row["_step"] == 20]
    assert last["samples._type"] == "images/separated" and last["samples.count"] == 2
    assert last["samples.captions"] == ["a red square", "a blue square"]
    # (b) the images themselves, as files that `wandb sync` uploads
    assert len(list((run_dir / "files" / "media" / "images").glob("samples_20_*.png"))) == 2
    # (c) offline, the config lives only in the run record (no files/config.yaml is written)
    (run,) = by_type["run"]
    config = {u.key: json.loads(u.value_json) for u in run.run.config.update}
    assert config["hub"] == {"hf_token": "***", "push": False}
    assert config["logging"]["wandb"] == {"api_key": "***", "project": "p"}
    assert config["model"] == CONFIG["model"]
    assert list(run.run.tags) == ["tiny"] and run.run.display_name == "t1"
    raw = b"".join(p.read_bytes() for p in run_dir.rglob("*") if p.is_file())
    assert not any(s.encode() in raw for s in SECRETS)
    # the artifact, with its metadata and file, waits in the log for `wandb sync`
    (art,) = by_type["artifact"]
    assert (art.artifact.name, art.artifact.type) == ("t1-lora", "lora")
    assert json.loads(art.artifact.metadata) == {"step": 20, "rank": 4}
    assert [c.path for c in art.artifact.manifest.contents] == ["lora.safetensors"]


def test_wandb_resume_reuses_the_run_id(offline_wandb, tmp_path):
    out = tmp_path / "out"
    first = make_tracker("wandb", project="fluxtune-test", run_name="r", tags=[], config={}, output_dir=out)
    first.log({"loss": 1.0}, step=0)
    first.finish()

    second = make_tracker("wandb", project="fluxtune-test", run_name="r", tags=[], config={}, output_dir=out,
                          resume_id=read_run_id(out))
    second.log({"loss": 0.5}, step=1)
    second.finish()

    # Offline there is no server to continue the run: W&B starts a second offline-run-* folder with
    # the same id and marks its run record `resume` (asked for); `resumed` stays False because only
    # the server decides that. `wandb sync` then appends both folders to one run.
    assert second.run_id == first.run_id == read_run_id(out)
    folders = run_dirs(offline_wandb, first.run_id)
    assert len(folders) == 2
    # Folder names carry the start second (and "-1" for a clash), so do not rely on their order.
    runs = [r.run for folder in folders for file in folder.glob("run-*.wandb") for r in settled_records(file)
            if r.WhichOneof("record_type") == "run"]
    assert [r.run_id for r in runs] == [first.run_id] * 2
    assert sorted(bool(r.resume) for r in runs) == [False, True] and not any(r.resumed for r in runs)


def test_tensorboard_writes_scalars_images_and_artifact_notes(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = make_tracker("tensorboard", project="p", run_name=None, tags=[], config=CONFIG, output_dir=tmp_path)
    assert tracker.run_id is None
    for step, loss in [(0, 1.5), (10, 0.75)]:
        tracker.log({"loss": loss, "lr": 1e-4}, step=step)
    tracker.log_images("samples", [Image.new("RGB", (8, 6), (0, 255, 0))] * 2, ["one", "two"], step=10)
    tracker.log_artifact(tmp_path / "lora", name="l", metadata={"step": 10})
    tracker.finish()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 1.5), (10, 0.75)]
    for i in range(2):
        (img,) = events.Images(f"samples/{i}")
        assert (img.step, img.width, img.height) == (10, 8, 6)
    notes = [json.loads(line) for line in (tmp_path / "tensorboard" / "artifacts.jsonl").read_text().splitlines()]
    assert notes == [{"name": "l", "path": str((tmp_path / "lora").resolve()), "metadata": {"step": 10}}]
    raw = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").iterdir())
    assert not any(s.encode() in raw for s in SECRETS)


@pytest.mark.parametrize("backend,enabled", [("none", True), ("wandb", False), ("tensorboard", False)])
def test_disabled_trackers_write_nothing(tmp_path, backend, enabled):
    tracker = make_tracker(backend, project="p", run_name="r", tags=[], config=CONFIG,
                           output_dir=tmp_path / "out", enabled=enabled)
    tracker.log({"loss": 1.0}, step=0)
    tracker.log_images("samples", [Image.new("RGB", (4, 4))], ["c"], step=0)
    tracker.log_artifact(tmp_path, name="l", metadata={})
    tracker.finish()
    assert tracker.run_id is None
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_and_missing_package_say_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="choose one of wandb, tensorboard, none"):
        make_tracker("mlflow", project="p", run_name=None, tags=[], config={}, output_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'fluxtune\[wandb\]'"):
        make_tracker("wandb", project="p", run_name=None, tags=[], config={}, output_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="pip install tensorboard"):
        make_tracker("tensorboard", project="p", run_name=None, tags=[], config={}, output_dir=tmp_path)


def test_redact_hides_secrets_at_any_depth_and_keeps_the_rest(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FROMTHEENVIRONMENT")
    config = {
        "token": "t", "password": "p", "wandbKey": "w", "AUTH": "a", "client_secret": "s",
        "max_sequence_length": 512, "text_encoder_out_layers": [9, 18], "num_tokens": 77, "tokenizer": "t5",
        "runs": [{"api_key": "k", "name": "x"}],
        "hub": {"repo": "me/lora", "upload_note": "hf_FROMTHEENVIRONMENT"},
    }
    before = json.dumps(config)
    out = redact(config)
    assert json.dumps(config) == before  # input not mutated
    assert all(out[k] == "***" for k in ("token", "password", "wandbKey", "AUTH", "client_secret"))
    assert {k: out[k] for k in ("max_sequence_length", "text_encoder_out_layers", "num_tokens", "tokenizer")} == \
        {"max_sequence_length": 512, "text_encoder_out_layers": [9, 18], "num_tokens": 77, "tokenizer": "t5"}
    assert out["runs"] == [{"api_key": "***", "name": "x"}]
    assert out["hub"] == {"repo": "me/lora", "upload_note": "***"}  # an env secret, whatever its key
    assert out["text_encoder_out_layers"] is not config["text_encoder_out_layers"]
