"""Training data from several sources: folders (.txt captions or a metadata.jsonl manifest) and
`datasets` datasets, combined with per-source repeats; `fluxtune data prepare` and `data bucket`."""

import json
import shutil
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from data_tools.demo_photos import write_demo_photos
from fluxtune.cli import main
from fluxtune.config import ConfigError, SourceConfig, load_config
from fluxtune.data.sources import DataError, dataset_items, folder_items, list_items, materialise_image
from fluxtune.train import train


def _copy(photos, folder):
    shutil.copytree(photos, folder)
    return folder


def _run_config(tmp_path, model, data: dict, steps=2) -> Path:
    """A minimal fast 64 px run (as tests/test_train.py), with `data` as the data section."""
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"path": str(model)},
           "data": {"resolution": 64, "cache_dir": str(tmp_path / "cache"), **data},
           "train": {"max_steps": steps, "batch_size": 2, "seed": 1, "save_every": 100},
           "lora": {"rank": 2}, "optim": {"lr": 1e-2}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _trained_images(run_dir: Path) -> int:
    return sum(b["images"] for b in json.loads((run_dir / "buckets.json").read_text())["buckets"].values())


def _pil_dataset(photos, folder: Path) -> Path:
    """A dataset on disk whose images are in-memory PIL images (no file behind them), under
    custom column names; the cat appears twice, with two captions."""
    pictures = [Image.open(photos / f"{n}.jpg").convert("RGB") for n in ("astronaut", "chelsea", "chelsea")]
    captions = ["an astronaut, sks", "a cat, sks", "a tabby cat, sks"]
    datasets.Dataset.from_dict({"picture": pictures, "caption": captions}).save_to_disk(folder)
    return folder


def test_manifest_captions_win_over_txt_files(photos, tmp_path):
    folder = _copy(photos, tmp_path / "photos")
    rows = [{"file_name": "astronaut.jpg", "text": "from the manifest"},
            {"file_name": "chelsea.jpg", "text": ""}]  # listed without text: its .txt caption
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = {i.image.name: i.caption for i in folder_items(folder, default_caption="default")}
    assert items == {"astronaut.jpg": "from the manifest",
                     "chelsea.jpg": (photos / "chelsea.txt").read_text().strip()}  # coffee.jpg: not listed

    (folder / "chelsea.txt").unlink()
    assert folder_items(folder, default_caption="default")[1].caption == "default"
    with pytest.raises(DataError, match=r"caption column 'caption' is in no row .* \(columns: file_name, text\)"):
        folder_items(folder, caption_column="caption")


def test_dataset_with_custom_columns_trains(photos, tiny_models, tmp_path):
    saved = _pil_dataset(photos, tmp_path / "saved")
    config = _run_config(tmp_path, tiny_models("flux2-klein"), {"sources": [
        {"dataset": str(saved), "image_column": "picture", "caption_column": "caption"}]})
    result = train(load_config(config))
    assert result.lora_path.is_file() and result.steps == 2
    assert _trained_images(result.output_dir) == 3
    assert len(list((tmp_path / "cache" / "images").iterdir())) == 2  # the cat is one file


def test_in_memory_images_get_content_addressed_files(photos, tmp_path):
    saved = _pil_dataset(photos, tmp_path / "saved")
    first = dataset_items(str(saved), tmp_path / "images", image_column="picture", caption_column="caption")
    again = dataset_items(str(saved), tmp_path / "images", image_column="picture", caption_column="caption")
    assert first == again
    assert [i.caption for i in first] == ["an astronaut, sks", "a cat, sks", "a tabby cat, sks"]
    assert first[1].image == first[2].image != first[0].image
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted({i.image.name for i in first})
    data = first[0].image.read_bytes()
    assert materialise_image(data, tmp_path / "images") == first[0].image
    assert Image.open(first[0].image).size == (512, 512)


def test_two_sources_with_repeats(photos, tmp_path):
    more = tmp_path / "more"
    write_demo_photos(more, names=["rocket", "coffee"])
    (more / "rocket.txt").unlink()
    data = yaml.safe_load(f"""
      sources:
        - {{path: {photos}, repeats: 2}}
        - {{path: {more}, default_caption: "a photo of sks"}}
    """)
    sources = load_config(_run_config(tmp_path, "m", data)).data.resolved_sources()
    assert list(sources) == ["data.sources.0", "data.sources.1"]
    items = list_items(sources, tmp_path / "images", default_caption="global default")
    assert len(items) == 3 * 2 + 2
    assert [i.image.name for i in items[:6]] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"] * 2
    assert {i.image.name: i.caption for i in items[6:]}["rocket.jpg"] == "a photo of sks"


def test_repeated_sources_train_every_occurrence(photos, tiny_models, tmp_path):
    config = _run_config(tmp_path, tiny_models("flux2-klein"), {"sources": [{"path": str(photos), "repeats": 2}]})
    result = train(load_config(config))
    assert _trained_images(result.output_dir) == 6


@pytest.mark.parametrize("data, message", [
    ({"path": "a", "sources": [{"path": "b"}]}, "data.sources: give data.path (one folder) or data.sources (a list), not both"),
    ({}, "data.path: required key is missing (or give data.sources"),
    ({"sources": [{"path": "a", "dataset": "b"}]}, "data.sources.0: give either path (a folder) or dataset"),
    ({"sources": [{"path": "a", "split": "test"}]}, "data.sources.0: split: only for a dataset source, not a path"),
    ({"sources": [{"path": "a", "repeat": 2}]}, "data.sources.0.repeat: unknown key; did you mean 'data.sources.0.repeats'?"),
])
def test_source_config_errors_name_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError) as err:
        load_config(_run_config(tmp_path, "m", data))
    assert message in str(err.value)


def test_missing_column_is_named_with_the_available_ones(photos, tmp_path):
    saved = _pil_dataset(photos, tmp_path / "saved")
    sources = {"data.sources.1": SourceConfig(dataset=str(saved), caption_column="text")}
    with pytest.raises(DataError, match=r"data.sources.1.image_column: no column 'image' in dataset .* "
                                        r"\(columns: picture, caption\)"):
        list_items(sources, tmp_path / "images")


def test_missing_datasets_package_gives_an_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    sources = {"data.sources.0": SourceConfig(dataset="user/name")}
    with pytest.raises(DataError, match=r"data.sources.0.dataset needs the datasets package: "
                                        r"pip install 'fluxtune\[datasets\]'"):
        list_items(sources, tmp_path / "images")


def test_prepare_writes_a_manifest_that_datasets_loads_and_training_uses(photos, tiny_models, tmp_path, capsys):
    folder = _copy(photos, tmp_path / "photos")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "coffee.txt").write_text("caption at prepare time")
    assert main(["data", "prepare", str(folder), "--resolution", "64"]) == 0
    assert "wrote" in capsys.readouterr().out

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    assert rows[1] == {"file_name": "chelsea.jpg", "text": (photos / "chelsea.txt").read_text().strip(),
                       "width": 451, "height": 300, "bucket": "80x48"}
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert loaded.num_rows == 3 and loaded[2]["text"] == "caption at prepare time"
    assert loaded[0]["image"].size == (512, 512)

    (folder / "coffee.txt").write_text("changed after prepare")  # the manifest's caption wins
    assert [i.caption for i in folder_items(folder)][2] == "caption at prepare time"
    result = train(load_config(_run_config(tmp_path, tiny_models("flux2-klein"), {"path": str(folder)})))
    assert result.lora_path.is_file() and _trained_images(result.output_dir) == 3


def test_bucket_command_shows_histogram_and_batches(photos, capsys):
    assert main(["data", "bucket", str(photos), "--resolution", "64", "--batch-size", "2", "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 images in 2 buckets (resolution 64, step 16)" in out
    assert "   80x48    (1.67)       2  " in out and "   64x64    (1.00)       1  " in out
    # a global batch of 4: one per bucket, filled by repeating 2 of 80x48's images and 3 times 64x64's
    assert "batch size 2 on 2 processes: 2 steps per epoch of 4 images, 5 images repeated to fill each bucket's last one" in out
