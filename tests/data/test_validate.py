"""`fluxtune data validate` on a corpus of broken and odd files (tests/bad_corpus.py), its --fix
copies, and training on the same corpus: every bad file is named once and skipped, the rest trains.
"""

import json
import os

import numpy as np
import pytest
from bad_corpus import write_bad_corpus
from PIL import Image

from fluxtune.cli import main
from fluxtune.config import load_config
from fluxtune.train import train

USABLE = ["astronaut.jpg", "blank.jpg", "chelsea.jpg", "cmyk.jpg", "coffee.jpg", "gray.png", "gray16.png", "latin1.jpg",
          "palette.png", "rgba.png", "rotated.jpg", "small.jpg", "uncaptioned.jpg", "wordy.jpg"]
SKIPPED_KINDS = {"corrupt", "empty-file", "not-an-image", "duplicate", "too-many-pixels", "too-small",
                 "extreme-aspect", "symlink-loop", "broken-link"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_bad_corpus(folder)


def snapshot(folder):
    """Every entry's bytes, or its link target for links: what "never modified" means."""
    return {p.name: os.readlink(p) if p.is_symlink() else p.read_bytes() for p in folder.iterdir()}


def findings_by_file(report_file):
    report = json.loads(report_file.read_text(encoding="utf-8"))
    found = {}
    for f in report["findings"]:
        found.setdefault(f["file"], set()).add(f["kind"])
    return report, found


def test_validate_names_every_bad_file_and_exits_0(corpus, tmp_path, capsys):
    folder, expected = corpus
    report_file = tmp_path / "report.json"
    assert main(["data", "validate", str(folder), "--resolution", "64", "--report", str(report_file)]) == 0

    report, found = findings_by_file(report_file)
    for name, kind in expected.items():
        if kind != "caption-too-long":  # needs --model
            assert kind in found.get(name, set()), f"{name}: expected {kind}, found {found.get(name)}"
    assert report["usable_files"] == USABLE and report["images"] == 25
    assert not found.keys() & {"astronaut.jpg", "chelsea.jpg", "coffee.jpg"}
    out = capsys.readouterr().out
    assert "usable: 14 of 25 images (11 skipped" in out
    assert "caption length: not checked (pass --model PATH" in out
    assert "symlink-loop      error         2  loop_a.jpg" in out
    assert not (folder / "validation.json").exists()  # nothing written into the checked folder


@pytest.mark.parametrize("kind", ["flux1", "flux2", "flux2-klein"])
def test_model_tokenizer_finds_captions_over_the_limit(kind, corpus, tiny_models, tmp_path, capsys):
    folder, _ = corpus
    report_file = tmp_path / "report.json"
    args = ["data", "validate", str(folder), "--resolution", "64", "--model", str(tiny_models(kind))]
    assert main([*args, "--report", str(report_file)]) == 0

    report, found = findings_by_file(report_file)
    too_long = [name for name, kinds in found.items() if "caption-too-long" in kinds]
    assert too_long == ["wordy.txt"]  # the long caption only: template tokens leave room for normal ones
    assert "limit 512 tokens" in report["token_check"]
    assert "caption-too-long  warning       1  wordy.txt" in capsys.readouterr().out


def test_fix_writes_repaired_copies_and_never_touches_the_originals(corpus, tmp_path, capsys):
    folder, _ = corpus
    before = snapshot(folder)
    fixed = tmp_path / "fixed"
    assert main(["data", "validate", str(folder), "--resolution", "64", "--fix", str(fixed)]) == 0
    assert snapshot(folder) == before

    assert sorted(p.name for p in fixed.glob("*") if p.suffix != ".txt") == USABLE
    assert (fixed / "astronaut.jpg").read_bytes() == (folder / "astronaut.jpg").read_bytes()  # fine: copied as is
    for name in USABLE:
        with Image.open(fixed / name) as img:
            assert img.mode == "RGB", name
            assert img.getexif().get(0x0112) in (None, 1), name
    with Image.open(fixed / "rotated.jpg") as img:
        assert img.size == (64, 96)  # 96x64 stored, orientation 6: upright is portrait
    rgba = np.asarray(Image.open(fixed / "rgba.png"))
    assert (rgba[:, 48:] == 255).all() and rgba[:, :48].min() < 200  # transparent half on white
    gray16 = np.asarray(Image.open(fixed / "gray16.png"))
    assert gray16.min() == 0 and gray16.max() == 255 and 100 < gray16.mean() < 155  # scaled, not clipped
    assert (fixed / "latin1.txt").read_text(encoding="utf-8") == "a café crème in the style of sks\n"
    assert not (fixed / "blank.txt").exists() and not (fixed / "uncaptioned.txt").exists()
    assert "wrote 14 images" in capsys.readouterr().out

    # The repaired folder is clean of errors; the fix never writes over the checked folder.
    assert main(["data", "validate", str(fixed), "--resolution", "64", "--report", str(tmp_path / "r.json")]) == 0
    _, found = findings_by_file(tmp_path / "r.json")
    assert not set().union(*found.values()) & (SKIPPED_KINDS | {"converted", "rotated", "caption-not-utf8"})
    assert main(["data", "validate", str(folder), "--fix", str(folder)]) == 1


def test_all_bad_folder_exits_1_with_a_clear_message(corpus, tmp_path, capsys):
    folder, _ = corpus
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ["notes.jpg", "dot.png", "truncated.jpg"]:
        (bad / name).write_bytes((folder / name).read_bytes())
    assert main(["data", "validate", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "usable: 0 of 3 images (3 skipped" in captured.out
    assert f"fluxtune: error: {bad}: none of the 3 images is usable" in captured.err


def test_training_skips_each_bad_file_with_one_warning_and_trains_on_the_rest(corpus, tiny_models, tmp_path, caplog,
                                                                              capfd):
    folder, expected = corpus
    settings = {"output_dir": tmp_path / "run", "model.path": tiny_models("flux2-klein"), "data.path": folder,
                "data.resolution": 64, "data.cache_dir": tmp_path / "cache", "train.max_steps": 2,
                "train.batch_size": 2, "lora.rank": 4, "train.save_every": 2}
    with caplog.at_level("WARNING", logger="fluxtune"):
        result = train(load_config(None, [f"{k}={v}" for k, v in settings.items()]))

    assert result.steps == 2 and np.isfinite(result.final_loss)
    # truncated.jpg passes the header checks and fails to decode in the cache: skipped there
    assert (result.cache.latents_encoded, result.cache.skipped) == (len(USABLE), 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for name, kind in expected.items():
        if kind in SKIPPED_KINDS or kind == "caption-not-utf8":
            naming = [w for w in warnings if f"{folder / name}:" in w]
            assert len(naming) == 1, f"{name}: {naming}"
    for name in USABLE:
        assert not [w for w in warnings if f"{folder / name}:" in w], name
    assert "Traceback" not in caplog.text + "".join(capfd.readouterr())
