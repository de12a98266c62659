"""Aspect-ratio buckets: sizes, assignment without upscaling, and a batch sampler that keeps one
size per batch, drops no image and gives every process the same number of batches."""

import math

import pytest

from fluxtune.buckets import BucketBatchSampler, assign_bucket, bucket_sizes, cover_crop, histogram


@pytest.mark.parametrize("resolution,step", [(512, 16), (1024, 64), (256, 16)])
def test_bucket_sizes_respect_area_step_and_aspect(resolution, step):
    sizes = bucket_sizes(resolution, step, max_aspect=4.0)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert max(w / h, h / w) <= 4.0
    assert len({w / h for w, h in sizes}) == len(sizes)  # one size per shape


def test_assignment_keeps_the_shape_and_never_upscales():
    sizes = bucket_sizes(512, 16)
    assert assign_bucket(1024, 1024, sizes) == (512, 512)
    w, h = assign_bucket(1200, 800, sizes)  # 3:2 landscape
    assert abs(w / h - 1.5) < 0.05 and w * h <= 512 * 512 and w > h
    w, h = assign_bucket(800, 1200, sizes)
    assert h > w
    small = assign_bucket(300, 200, sizes)  # smaller than any 3:2 bucket at 512
    assert small[0] <= 300 and small[1] <= 200 and small[0] % 16 == 0 and small[1] % 16 == 0
    assert assign_bucket(300, 200, sizes, upscale=True)[0] > 300
    tall = assign_bucket(10, 20000, sizes)  # beyond the widest shape: the most extreme bucket, shrunk
    assert tall[0] == 16 and tall[1] % 16 == 0


def test_cover_crop_fills_the_target_exactly():
    (rw, rh), box = cover_crop(1200, 800, (624, 416))
    assert rw >= 624 and rh >= 416 and (box[2] - box[0], box[3] - box[1]) == (624, 416)
    assert box[0] >= 0 and box[1] >= 0 and box[2] <= rw and box[3] <= rh


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_one_size_per_batch_no_image_dropped_and_repeats_counted():
    buckets = [(512, 512)] * 5 + [(624, 416)] * 3 + [(416, 624)] * 1
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0)
    batches = epoch_batches(sampler, 0)
    n = len(buckets)
    assert len(batches) == len(sampler) == 3 + 2 + 1
    for batch in batches:
        assert len(batch) == 2 and len({buckets[i % n] for i in batch}) == 1
    flat = [i for b in batches for i in b]
    assert {i % n for i in flat} == set(range(n))  # every image trains each epoch
    assert len(set(flat)) == len(flat)  # a repeat carries its own index (its own noise)
    summary = sampler.summary()
    assert summary["buckets"]["416x624"] == {"images": 1, "batches": 1, "repeated": 1}
    assert summary["buckets"]["512x512"]["repeated"] == 1


def test_sampler_order_depends_on_seed_and_epoch_only():
    buckets = [(512, 512)] * 7 + [(624, 416)] * 6
    a, b = BucketBatchSampler(buckets, 2, seed=1), BucketBatchSampler(buckets, 2, seed=1)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 3) != epoch_batches(a, 4)
    assert epoch_batches(a, 3) != epoch_batches(BucketBatchSampler(buckets, 2, seed=2), 3)


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_every_process_gets_the_same_number_of_batches(replicas):
    buckets = [(512, 512)] * 5 + [(624, 416)] * 3 + [(416, 624)] * 1  # 6 bucket batches of 2
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0, num_replicas=replicas)
    batches = epoch_batches(sampler, 0)
    assert len(batches) % replicas == 0 and len(batches) == math.ceil(6 / replicas) * replicas
    shards = [batches[r::replicas] for r in range(replicas)]  # how accelerate deals batches out
    assert len({len(s) for s in shards}) == 1
    assert sampler.summary()["batches_repeated_for_even_ranks"] == len(batches) - 6


def test_histogram_lists_buckets_by_count():
    text = histogram([(512, 512)] * 3 + [(624, 416)])
    first, second = text.splitlines()
    assert first.split()[0] == "512x512" and "3" in first.split() and second.split()[0] == "624x416"


def test_photos_of_different_shapes_train_in_their_own_buckets(tiny_models, tmp_path):
    """Six real photos (square, 3:2, 4:3, 1.15:1 ...) at 128 px: each latent has its bucket's shape,
    no bucket is larger than its image, and the run says which buckets it used."""
    import json

    from safetensors.torch import load_file

    from data_tools.demo_photos import write_demo_photos
    from fluxtune.config import load_config
    from fluxtune.data import bucket_targets, image_size, scan_image_folder
    from fluxtune.train import train

    photos = tmp_path / "photos"
    write_demo_photos(photos, trigger="sks")
    out = tmp_path / "run"
    train(load_config(None, [f"output_dir={out}", f"model.path={tiny_models('flux2-klein')}", f"data.path={photos}",
                             "data.resolution=128", "train.max_steps=2", "train.batch_size=2",
                             f"data.cache_dir={tmp_path / 'cache'}"]))
    used = json.loads((out / "buckets.json").read_text())["buckets"]
    items = scan_image_folder(photos)
    targets = bucket_targets(items, 128, step=16, upscale=False, max_aspect=4.0)
    assert set(used) == {f"{w}x{h}" for w, h in targets.values()} and len(used) >= 3
    assert sum(b["images"] for b in used.values()) == len(items) == 6
    for item, (w, h) in targets.items():
        iw, ih = image_size(item.image)
        assert w <= iw and h <= ih and w * h <= 128 * 128
        assert abs(w / h - iw / ih) < 0.25  # near its own shape, not a square crop
    latents = [load_file(f)["latents"] for f in (tmp_path / "cache" / "latents").glob("*.safetensors")]
    shapes = {tuple(z.shape[-2:]) for z in latents}
    # FLUX.2 latents: VAE /8, then 2x2 patches folded into channels: /16
    assert {(h // 16, w // 16) for w, h in targets.values()} == shapes
