"""Cache integrity: every entry carries a checksum; a corrupt, torn or unfinished entry is
re-encoded (with one warning naming it), never served."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxtune.data.cache import CHECKSUM_KEY, build_cache, entry_problem, tensors_sha256, write_atomic
from fluxtune.data.sources import scan_image_folder
from fluxtune.models.families import load_family

CPU = torch.device("cpu")
RESOLUTION = 64


def cache(family, items, folder):
    # One image per VAE call: convolutions over a batch of 3 differ from a batch of 1 in the last
    # bits (~1e-6), and re-encoded entries are compared bit for bit with the originals.
    return build_cache(family, items, folder, RESOLUTION, CPU, batch_size=1)


def load(file: Path) -> dict:
    """A copy: load_file's tensors map the file, so they would change with it."""
    return {k: v.clone() for k, v in load_file(file).items()}


@pytest.fixture(scope="module")
def family(tiny_models):
    return load_family(str(tiny_models("flux2-klein")))


@pytest.fixture
def built(family, photos, tmp_path):
    """A fresh cache of the three photos: (items, entries, cache folder)."""
    items = scan_image_folder(photos)
    assert len({i.caption for i in items}) == len(items) == 3  # one text entry per item
    entries, stats = cache(family, items, tmp_path / "cache")
    assert (stats.latents_encoded, stats.texts_encoded, stats.reused, stats.skipped) == (3, 3, 0, 0)
    return items, entries, tmp_path / "cache"


def flip_data_bytes(path: Path) -> None:
    """Invert a few bytes of tensor data; the JSON header (its length first, as u64) stays valid."""
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    middle = (data_start + len(raw)) // 2
    for i in range(middle, middle + 4):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def warnings_about(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fluxtune" and r.levelno == logging.WARNING]


def test_entries_carry_a_checksum_of_their_tensors(built):
    _, entries, _ = built
    for latent, text in entries.values():
        for file in (latent, text):
            with safe_open(str(file), "pt") as f:
                assert f.metadata()[CHECKSUM_KEY] == tensors_sha256(load_file(file))
            assert entry_problem(file) is None


def test_corrupt_and_torn_entries_are_re_encoded(family, built, caplog):
    items, entries, folder = built
    originals = {f: load(f) for pair in entries.values() for f in pair}
    bad_latent, bad_text = entries[items[0]][0], entries[items[1]][1]
    flip_data_bytes(bad_latent)
    with safe_open(str(bad_latent), "pt") as f:  # still a well-formed file: only the checksum can tell
        assert not torch.equal(f.get_tensor("latents"), originals[bad_latent]["latents"])
    bad_text.write_bytes(bad_text.read_bytes()[: bad_text.stat().st_size // 2])

    caplog.set_level(logging.WARNING, logger="fluxtune")
    again, stats = cache(family, items, folder)

    assert (stats.latents_encoded, stats.texts_encoded, stats.reused, stats.skipped) == (1, 1, 1, 0)
    assert again == entries
    warnings = warnings_about(caplog)
    assert len(warnings) == 2, warnings
    (latent_warning,) = [w for w in warnings if str(bad_latent) in w]
    (text_warning,) = [w for w in warnings if str(bad_text) in w]
    assert "is corrupt (checksum mismatch); re-encoding" in latent_warning
    assert "is corrupt (unreadable" in text_warning and "re-encoding" in text_warning
    for file, tensors in originals.items():
        now = load_file(file)
        assert now.keys() == tensors.keys()
        assert all(torch.equal(now[k], tensors[k]) for k in tensors), file
        assert entry_problem(file) is None

    caplog.clear()
    _, stats = cache(family, items, folder)
    assert (stats.latents_encoded, stats.texts_encoded, stats.reused) == (0, 0, 3)
    assert warnings_about(caplog) == []


def test_entry_without_checksum_is_re_encoded(family, built, caplog):
    """Entries from before checksums (or written by another tool) are not trusted."""
    items, entries, folder = built
    text = entries[items[2]][1]
    save_file(load(text), str(text))  # same tensors, no metadata
    assert entry_problem(text) == "no checksum"
    caplog.set_level(logging.WARNING, logger="fluxtune")
    _, stats = cache(family, items, folder)
    assert (stats.latents_encoded, stats.texts_encoded, stats.reused) == (0, 1, 2)
    (warning,) = warnings_about(caplog)
    assert f"cache entry {text} is corrupt (no checksum); re-encoding" == warning


def test_killed_write_leaves_only_a_tmp_file_that_is_never_an_entry(family, built, caplog):
    items, entries, folder = built
    latent = entries[items[0]][0]
    expected = load(latent)
    latent.unlink()
    # A process killed between writing and renaming: the whole file, under its .tmp name.
    script = (
        "import os, sys, torch\n"
        "from pathlib import Path\n"
        "from fluxtune.data import cache\n"
        "os.replace = lambda *a: os._exit(9)\n"
        "cache.write_atomic({'latents': torch.zeros(3)}, Path(sys.argv[1]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(latent)], cwd=Path(__file__).parents[2])
    assert done.returncode == 9
    (tmp,) = latent.parent.glob(f".{latent.name}.*.tmp")
    assert not latent.exists()
    # ... and one killed halfway through writing.
    torn = latent.parent / f".{latent.name}.{os.getpid() + 1}.tmp"
    torn.write_bytes(tmp.read_bytes()[:20])

    caplog.set_level(logging.WARNING, logger="fluxtune")
    again, stats = cache(family, items, folder)
    assert (stats.latents_encoded, stats.texts_encoded, stats.reused) == (1, 0, 2)
    assert warnings_about(caplog) == []  # a missing entry is no corruption
    assert again[items[0]][0] == latent
    assert torch.equal(load_file(latent)["latents"], expected["latents"])  # not the zeros in the .tmp
    assert all(".tmp" not in str(f) for pair in again.values() for f in pair)


def test_failed_write_removes_its_tmp_file(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomic({"x": torch.ones(2)}, tmp_path / "entry.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_checksum_covers_names_dtypes_and_shapes():
    base = tensors_sha256({"a": torch.arange(4, dtype=torch.float32)})
    assert tensors_sha256({"b": torch.arange(4, dtype=torch.float32)}) != base
    assert tensors_sha256({"a": torch.arange(4, dtype=torch.float32).view(2, 2)}) != base
    assert tensors_sha256({"a": torch.arange(4, dtype=torch.int32)}) != base
    assert tensors_sha256({"a": torch.arange(4, dtype=torch.float32)}) == base
    assert tensors_sha256({"a": torch.ones(3, dtype=torch.bfloat16)})  # dtypes numpy lacks


def test_text_settings_do_not_touch_latent_keys_and_the_reverse(tiny_models):
    from fluxtune.models.families import load_family

    path = str(tiny_models("flux2"))
    a, b = load_family(path), load_family(path, text_encoder_out_layers=(0, 1, 2))
    assert a.identity("latents") == b.identity("latents")
    assert a.identity("text") != b.identity("text")
