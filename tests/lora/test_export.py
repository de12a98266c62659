"""`fluxtune export`: a trained run becomes a folder with the LoRA (any layout), its metadata, a
Hugging Face model card and sample images; `--push-to-hub` uploads exactly that folder.
"""

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from fluxtune.cli import main
from fluxtune.config import load_config
from fluxtune.data.sources import dataset_sha256, scan_image_folder
from fluxtune.errors import LoraError
from fluxtune.lora.export import push_to_hub
from fluxtune.models.families import load_family
from fluxtune.lora.formats import FORMATS, content_hash, delta_close, read_lora
from fluxtune.train import train

from test_lora_formats import adapted_layers


@pytest.fixture(scope="module")
def run(tiny_models, photos, tmp_path_factory):
    """A finished tiny FLUX.2-klein run with sample grids (step 0 and the last step)."""
    out = tmp_path_factory.mktemp("export") / "cats-run"
    overrides = [f"output_dir={out}", f"model.path={tiny_models('flux2-klein')}", f"data.path={photos}",
                 "data.resolution=64", "train.max_steps=4", "train.batch_size=2", "lora.rank=4", "lora.alpha=8",
                 "optim.lr=0.01", "sample.every=4", "sample.steps=2", 'sample.prompts=["a photo of sks"]']
    train(load_config("/dev/null", overrides))
    return out


def header(file) -> dict:
    with safe_open(str(file), "pt") as f:
        return dict(f.metadata())


def test_training_writes_modelspec_and_the_training_summary(run, photos):
    fields = header(run / "lora" / "pytorch_lora_weights.safetensors")
    assert fields["modelspec.sai_model_spec"] == "1.0.0"
    assert fields["modelspec.architecture"] == "flux-2/lora"  # tiny shapes: no official variant claimed
    assert fields["modelspec.title"] == "cats-run" and fields["modelspec.resolution"] == "64x64"
    assert fields["modelspec.date"].endswith("Z")
    summary = json.loads(fields["fluxtune.training"])
    assert summary["steps"] == 4 and summary["rank"] == 4 and summary["alpha"] == 8
    assert summary["optimizer"]["lr"] == 0.01 and summary["targets"] == "attention"
    assert summary["dataset"] == {"images": 3, "sha256": dataset_sha256(scan_image_folder(photos))}


def test_dataset_hash_follows_content_not_location(photos, tmp_path):
    copy = shutil.copytree(photos, tmp_path / "elsewhere")
    assert dataset_sha256(scan_image_folder(copy)) == dataset_sha256(scan_image_folder(photos))
    (copy / "astronaut.txt").write_text("another caption", encoding="utf-8")
    assert dataset_sha256(scan_image_folder(copy)) != dataset_sha256(scan_image_folder(photos))


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_folder_loads_in_diffusers_and_describes_itself(run, fmt, tiny_models, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", fmt, "--out", str(out), "--trigger", "sks",
                 "--base-model", "black-forest-labs/FLUX.2-klein-base-4B", "--license", "apache-2.0"]) == 0
    weights = out / ("pytorch_lora_weights.safetensors" if fmt == "diffusers" else "cats-run.safetensors")
    assert weights.is_file() and (out / "README.md").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", "step-000004.png"]

    fields = header(weights)
    assert fields["modelspec.trigger_phrase"] == "sks" and fields["fluxtune.format"] == fmt
    assert fields["fluxtune.base_model"] == "black-forest-labs/FLUX.2-klein-base-4B"
    assert fields["modelspec.hash_sha256"] == content_hash(load_file(weights))
    assert json.loads(fields["fluxtune.training"])["steps"] == 4

    trained = read_lora(run / "lora")
    assert delta_close(trained, read_lora(weights), atol=1e-6) == []
    fam = load_family(str(tiny_models("flux2-klein")))
    pipe = fam.load_pipeline(torch.float32)
    pipe.load_lora_weights(str(out), **({} if fmt == "diffusers" else {"weight_name": weights.name}))
    assert adapted_layers(pipe.transformer) == set(trained.modules)

    capsys.readouterr()
    assert main(["lora", "info", str(weights)]) == 0
    info = capsys.readouterr().out
    assert "modelspec.trigger_phrase" in info and "sks" in info and '"steps": 4' in info and "matches" in info


def test_model_card_front_matter_and_usage(run, tmp_path):
    main(["export", str(run), "--out", str(tmp_path / "e"), "--trigger", "sks", "--trigger", "sks style",
          "--base-model", "black-forest-labs/FLUX.2-klein-base-4B"])
    text = (tmp_path / "e" / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "black-forest-labs/FLUX.2-klein-base-4B"
    assert meta["instance_prompt"] == "sks, sks style" and "lora" in meta["tags"]
    assert meta["widget"][0]["output"]["url"] == "samples/step-000004.png"
    assert (tmp_path / "e" / meta["widget"][0]["output"]["url"]).is_file()
    assert "from diffusers import Flux2Pipeline" in body and "load_lora_weights" in body
    assert "| steps | 4 |" in body and "`sks`" in body


def test_local_base_paths_stay_out_of_the_card(run, tmp_path):
    main(["export", str(run), "--out", str(tmp_path / "e")])
    front = yaml.safe_load((tmp_path / "e" / "README.md").read_text(encoding="utf-8").split("---\n")[1])
    assert "base_model" not in front  # the run's model.path is a local folder, not a Hub id


def test_export_replaces_an_old_export_whole(run, tmp_path):
    out = tmp_path / "e"
    main(["export", str(run), "--format", "kohya", "--out", str(out)])
    main(["export", str(run), "--format", "diffusers", "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]


def test_export_errors_name_the_problem(run, tmp_path):
    with pytest.raises(LoraError, match="no lora_ema"):
        main_raises(["export", str(run), "--ema", "--out", str(tmp_path / "e")])
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 1


def main_raises(argv):
    from fluxtune.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.fn(args)


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records the calls, sends nothing."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def test_push_to_hub_uploads_the_export_folder(run, tmp_path):
    folder = tmp_path / "e"
    main(["export", str(run), "--out", str(folder), "--trigger", "sks"])
    hub = RecordingHub()
    push_to_hub(folder, "me/cats", private=True, api=hub)
    (create, repo, kwargs), (upload, repo2, up) = hub.calls
    assert (create, repo, kwargs["private"], upload, repo2) == ("create_repo", "me/cats", True, "upload_folder", "me/cats")
    assert up["folder_path"] == str(folder)
    assert {p.name for p in folder.iterdir()} == {"pytorch_lora_weights.safetensors", "README.md", "samples"}
    with pytest.raises(LoraError, match="user/name"):
        push_to_hub(folder, "not a repo", api=hub)
