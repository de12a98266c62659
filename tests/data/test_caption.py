"""`fluxtune data caption`: tiny random Florence-2, BLIP and LLaVA checkpoints (data_tools.tiny_vlm),
saved and loaded back with `from_pretrained` like real ones, caption real photos on CPU.

The tiny models know only whole words, so a caption has one word per generated token.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.caption import KINDS, clean_caption, resolve_prompt, with_trigger, write_atomic
from data_tools.tiny_vlm import make_tiny_vlm
from fluxtune.cli import main
from fluxtune.errors import UserError


@pytest.fixture(scope="session")
def captioners(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {kind: str(make_tiny_vlm(kind, root / kind)) for kind in ("florence2", "blip", "llava")}


def image_folder(photos, folder: Path, count: int = 3) -> Path:
    """`count` uncaptioned copies of the session's photos."""
    folder.mkdir(exist_ok=True)
    sources = sorted(photos.glob("*.jpg"))
    for i in range(count):
        shutil.copy(sources[i % len(sources)], folder / f"img{i:02d}.jpg")
    return folder


def caption(folder, model, *options) -> int:
    return main(["data", "caption", str(folder), "--model", model, *map(str, options)])


def captions(folder) -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(Path(folder).glob("*.txt"))}


@pytest.mark.parametrize("kind", ["florence2", "blip", "llava"])
def test_each_model_kind_writes_one_caption_per_image(kind, captioners, photos, tmp_path, capsys):
    folder = image_folder(photos, tmp_path / "images")
    assert caption(folder, captioners[kind], "--batch-size", 2, "--max-length", 6) == 0  # batches of 2 and 1
    written = captions(folder)
    assert sorted(written) == ["img00", "img01", "img02"]
    for text in written.values():
        assert text.endswith("\n") and 1 <= len(text.split()) <= 6, text
    assert "captioned 3, skipped 0 existing, failed 0" in capsys.readouterr().out


def test_max_length_caps_the_new_tokens(captioners, photos, tmp_path):
    folder = image_folder(photos, tmp_path / "images")
    assert caption(folder, captioners["blip"], "--max-length", 3) == 0
    assert all(len(text.split()) <= 3 for text in captions(folder).values())
    assert caption(folder, captioners["blip"], "--max-length", 12, "--overwrite") == 0
    assert max(len(text.split()) for text in captions(folder).values()) > 3  # the limit, not the model, stopped it


def test_trigger_starts_every_caption(captioners, photos, tmp_path):
    folder = image_folder(photos, tmp_path / "images")
    assert caption(folder, captioners["florence2"], "--trigger", "sks", "--extension", ".caption") == 0
    written = [p.read_text() for p in folder.glob("*.caption")]
    assert len(written) == 3 and all(text.startswith("sks, ") for text in written)
    assert with_trigger("a photo of sks on a beach", "sks") == "a photo of sks on a beach"  # not twice


def test_existing_captions_are_kept_unless_overwrite(captioners, photos, tmp_path, capsys):
    folder = image_folder(photos, tmp_path / "images")
    (folder / "img00.txt").write_text("my own caption\n")
    (folder / "img01.txt").write_text("  \n")  # empty: captioned
    assert caption(folder, captioners["blip"]) == 0
    assert "captioned 2, skipped 1 existing, failed 0" in capsys.readouterr().out
    first = captions(folder)
    assert first["img00"] == "my own caption\n" and first["img01"].strip() and first["img02"].strip()

    assert caption(folder, captioners["blip"], "--overwrite", "--trigger", "ohwx") == 0
    assert "captioned 3, skipped 0 existing" in capsys.readouterr().out
    assert all(text.startswith("ohwx, ") for text in captions(folder).values())


def test_a_caption_file_is_absent_or_complete_and_no_temp_file_remains(tmp_path, monkeypatch):
    target = tmp_path / "img.txt"
    target.write_text("old caption\n")

    def killed(src, dst):  # the process dies between writing the temporary file and the rename
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            write_atomic(target, "new caption")
    assert target.read_text() == "old caption\n"  # untouched, never half-written
    write_atomic(target, "new caption")  # the rerun reuses and removes the leftover
    assert target.read_text() == "new caption\n"
    assert [p.name for p in tmp_path.iterdir()] == ["img.txt"]


def test_resumes_after_sigkill_without_losing_or_changing_captions(captioners, photos, tmp_path, capsys):
    folder = image_folder(photos, tmp_path / "images", count=20)
    cmd = [sys.executable, "-m", "fluxtune.cli", "data", "caption", str(folder), "--model", captioners["blip"],
           "--batch-size", "1", "--max-length", "100"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("*.txt"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = captions(folder)
    assert 2 <= len(before) < 20, "the run should be killed midway"
    assert all(text.endswith("\n") and text.strip() for text in before.values())  # complete files only

    assert caption(folder, captioners["blip"], "--batch-size", 4) == 0
    after = captions(folder)
    assert len(after) == 20 and all(after[name] == text for name, text in before.items())
    assert f"captioned {20 - len(before)}, skipped {len(before)} existing, failed 0" in capsys.readouterr().out
    assert not [p for p in folder.iterdir() if p.suffix not in {".jpg", ".txt"}]  # no temporary files left


def test_corrupt_images_are_reported_and_skipped(captioners, photos, tmp_path, capsys, caplog):
    folder = image_folder(photos, tmp_path / "images")
    good = (folder / "img00.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    assert caption(folder, captioners["llava"], "--batch-size", 4) == 0
    assert sorted(captions(folder)) == ["img00", "img01", "img02"]
    assert "captioned 3, skipped 0 existing, failed 3" in capsys.readouterr().out
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 3 and all(any(name in line for line in skipped) for name in ("truncated", "empty", "notes"))


def test_unknown_model_type_is_refused_with_the_supported_kinds(tmp_path, photos, capsys):
    folder = image_folder(photos, tmp_path / "images", count=1)
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    assert caption(folder, str(model)) == 1
    err = capsys.readouterr().err
    assert "model_type 'bert' is not a supported captioner" in err and "florence2, blip, llava, qwen2_vl" in err
    (model / "config.json").write_text('{"model_type": "florence2", "auto_map": {"AutoConfig": "x.Florence2Config"}}')
    assert caption(folder, str(model)) == 1
    assert "florence-community/Florence-2-large" in capsys.readouterr().err
    assert not list(folder.glob("*.txt"))


def test_options_a_model_cannot_use_fail_before_loading_it(captioners, photos, tmp_path, capsys):
    folder = image_folder(photos, tmp_path / "images", count=1)
    for options, message in [(["--instruction", "Describe it."], "--instruction is for chat VLMs"),
                             (["--extension", ".jpg"], "captions would overwrite images"),
                             (["--task", "<OD>"], "--task is for Florence-2")]:
        assert caption(folder, captioners["blip"], *options) == 1
        assert message in capsys.readouterr().err
    assert caption(folder, captioners["florence2"], "--task", "<OD>") == 1
    assert "not a captioning task" in capsys.readouterr().err


def test_chat_instructions_fill_the_trigger_and_outputs_are_cleaned():
    chat, florence = KINDS["qwen2_5_vl"], KINDS["florence2"]
    assert resolve_prompt(chat, None, None, None) == "Describe this image in one detailed sentence."
    subject = resolve_prompt(chat, None, "subject", "ohwx")
    assert "named ohwx" in subject and "{trigger}" not in subject
    assert resolve_prompt(chat, None, "Describe all but {trigger}.", "sks") == "Describe all but sks."
    with pytest.raises(UserError, match="--trigger"):
        resolve_prompt(chat, None, "style", None)
    assert resolve_prompt(florence, None, None, None) == "<MORE_DETAILED_CAPTION>"

    assert clean_caption("</s><s>A cat on a mat.</s><pad><pad>") == "A cat on a mat."
    assert clean_caption("<MORE_DETAILED_CAPTION>  A red\n car. ") == "A red car."
    assert clean_caption("assistant: Describe this image. A dog.", "Describe this image.") == "A dog."
    assert clean_caption('<think>hmm</think> "A tree."<|im_end|>') == "A tree."


def test_two_processes_caption_disjoint_shards(captioners, photos, tmp_path):
    folder = image_folder(photos, tmp_path / "images", count=10)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "fluxtune.cli", "data", "caption", str(folder), "--model", captioners["blip"], "--batch-size", "2"]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(captions(folder)) == 10
    # One summary, from the main process; 5 + 5 means each image was captioned once, by one rank.
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("captioned")]
    assert summaries == [summaries[0]] and summaries[0].startswith("captioned 10 (2 processes: 5 + 5), skipped 0")
