"""Captions at train time: trigger word, caption dropout, tag shuffling and per-line variants, each a
pure function of (seed, epoch, sample), and every caption a run uses cached before the encoders go.
That two processes train with the same captions as one is part of tests/test_distributed.py's
split-equivalence test."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fluxtune.data.cache import cache_texts
from fluxtune.data.captions import CaptionSettings, caption_variants, choose_caption, eval_caption
from fluxtune.config import ConfigError, load_config
from fluxtune.data.sources import scan_image_folder
from fluxtune.models.families import load_family
from fluxtune.train import train

TAGS = "a cat, red sofa, window, evening light, film grain"
SEED = 1
SAMPLES = 6  # three photos x 2 repeats, in two aspect-ratio buckets (1 + 2 photos): 3 batches of 2 an epoch
STEPS = 6  # two whole epochs, so the run visits every sample index of both
FEATURES = {"data.trigger_word": "zxq", "data.caption_dropout": 0.3, "data.shuffle_tags": "true",
            "data.keep_tags": 1}


def pick(caption, epoch=0, index=0, seed=SEED, **settings):
    return choose_caption(caption, CaptionSettings(**settings), seed, epoch, index)


def test_trigger_word_is_inserted_first_and_never_doubled():
    assert pick("a cat", trigger_word="sks") == "sks, a cat"
    assert pick("a cat, in the style of sks", trigger_word="sks") == "a cat, in the style of sks"
    assert pick("someone asks a question", trigger_word="sks") == "sks, someone asks a question"
    assert pick("", trigger_word="sks") == "sks"
    assert pick(pick("a cat", trigger_word="sks"), trigger_word="sks") == "sks, a cat"


def test_caption_dropout_rate_is_near_p_and_gives_the_empty_caption():
    captions = [pick(TAGS, epoch, index, dropout=0.3) for epoch in range(20) for index in range(200)]
    rate = captions.count("") / len(captions)
    assert abs(rate - 0.3) < 0.03 and set(captions) == {"", TAGS}


def test_shuffle_keeps_the_leading_tags_and_reorders_the_rest_across_epochs():
    for keep in (1, 2):
        orders = [pick(TAGS, epoch, shuffle_tags=True, keep_tags=keep).split(", ") for epoch in range(10)]
        assert all(o[:keep] == TAGS.split(", ")[:keep] and sorted(o) == sorted(TAGS.split(", ")) for o in orders)
        assert len({tuple(o) for o in orders}) > 3
    # an inserted trigger word stays first and counts as a kept tag
    orders = [pick(TAGS, epoch, trigger_word="sks", shuffle_tags=True, keep_tags=0) for epoch in range(10)]
    assert all(o.startswith("sks, ") for o in orders) and len(set(orders)) > 3


def test_caption_lines_are_variants_that_cycle_with_the_epoch():
    caption = "a red cat\n\n  a cat on a sofa  \na photo of a cat\n"
    assert caption_variants(caption) == ["a red cat", "a cat on a sofa", "a photo of a cat"]
    assert [pick(caption, epoch, index=5) for epoch in range(6)] == caption_variants(caption) * 2
    assert caption_variants("one line") == ["one line"]
    assert eval_caption(caption, CaptionSettings(trigger_word="sks")) == "sks, a red cat"


def test_choices_depend_only_on_seed_epoch_and_index():
    settings = dict(trigger_word="sks", dropout=0.3, shuffle_tags=True)
    keys = [(epoch, index) for epoch in range(5) for index in range(20)]
    first = [pick(TAGS, e, i, **settings) for e, i in keys]
    assert first == [pick(TAGS, e, i, **settings) for e, i in keys]
    assert first != [pick(TAGS, e, i, seed=SEED + 1, **settings) for e, i in keys]


def test_nothing_is_active_for_one_line_captions_without_the_features():
    assert not CaptionSettings().active(["a cat", "a dog, sofa"])
    assert CaptionSettings().active(["a cat", "a dog\na brown dog"])
    assert CaptionSettings(dropout=0.1).active(["a cat"])


@pytest.mark.parametrize("key, value, message", [
    ("data.caption_dropout", 1.0, "less than 1"),
    ("data.caption_dropout", -0.1, "greater than or equal to 0"),
    ("data.keep_tags", -1, "greater than or equal to 0"),
    ("data.shuffle_tags", "maybe", "valid boolean"),
    ("data.trigger_word", "sks, style", "without commas"),
    ("data.trigger_word", " ", "without commas"),
    ("data.trigger_wrod", "sks", "did you mean 'data.trigger_word'"),
])
def test_bad_caption_settings_are_config_errors(key, value, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["output_dir=o", "model.path=m", "data.path=d", f"{key}={value}"])
    assert key in str(e.value) and message in str(e.value)


@pytest.fixture(scope="module")
def variant_photos(photos, tmp_path_factory):
    """The three photos, one of them with a two-line caption (two variants)."""
    folder = tmp_path_factory.mktemp("variants")
    for f in photos.iterdir():
        shutil.copy(f, folder / f.name)
    (folder / "chelsea.txt").write_text("a cat, on a table, indoors\na tabby cat, close up\n", encoding="utf-8")
    return folder


def settings(model, photos, out, cache, **extra):
    items = {"output_dir": out, "model.path": model, "data.path": photos, "data.resolution": 64,
             "data.cache_dir": cache, "data.repeats": 2, "train.max_steps": STEPS, "train.batch_size": 2, "train.seed": SEED,
             "lora.rank": 4, "optim.lr": 1e-2, "train.save_every": 2, "eval.path": photos, "eval.every": 3,
             **FEATURES, **extra}
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def straight(tiny_models, variant_photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    result = train(load_config(None, settings(tiny_models("flux2-klein"), variant_photos, root / "run", root / "cache")))
    return result, root / "cache"


def test_the_cache_holds_exactly_the_captions_the_run_trains_and_scores_with(straight, variant_photos, tiny_models):
    """Derived here from the sample order (every index 0..5 once an epoch): the run must have cached
    these captions, and nothing else."""
    result, cache = straight
    assert json.loads((result.output_dir / "buckets.json").read_text())["steps_per_epoch"] * 2 == SAMPLES
    items = scan_image_folder(variant_photos)
    s = CaptionSettings("zxq", FEATURES["data.caption_dropout"], True, 1)
    trained = {choose_caption(items[i % 3].caption, s, SEED, e, i)
               for e in range(STEPS * 2 // SAMPLES) for i in range(SAMPLES)}
    scored = {eval_caption(item.caption, s) for item in items}
    assert "" in trained and {"zxq, a cat, on a table, indoors", "zxq, a tabby cat, close up"} <= trained | scored
    assert len(list((cache / "text").glob("*.safetensors"))) == len(trained | scored) == result.cache.texts_encoded
    _, encoded = cache_texts(load_family(str(tiny_models("flux2-klein"))), sorted(trained | scored), cache,
                             torch.device("cpu"))
    assert encoded == 0  # every caption used is cached; with the count above, nothing else is


def test_a_resumed_run_with_the_features_on_is_bit_identical(straight, tiny_models, variant_photos, tmp_path):
    """Resumed mid-epoch (step 4 of 3-batch epochs): captions come from (seed, epoch, index), not
    from any state the first run held, so the LoRA ends the same to the bit."""
    result, cache = straight
    checkpoint = result.output_dir / "state" / "step-000004"
    resumed = train(load_config(None, settings(tiny_models("flux2-klein"), variant_photos, tmp_path / "run", cache,
                                               **{"train.resume": checkpoint})))
    assert resumed.cache.texts_encoded == 0
    a, b = load_file(result.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
