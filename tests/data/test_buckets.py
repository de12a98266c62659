"""Aspect-ratio buckets: sizes, assignment without upscaling, and a batch sampler that keeps one
size per batch, drops no image, and orders the data by the global batch alone: any split of it
over processes and accumulation steps trains on the same samples at every step."""

import pytest

from fluxtune.data.buckets import BucketBatchSampler, assign_bucket, bucket_sizes, cover_crop, histogram


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
    assert summary["steps_per_epoch"] == 6 and summary["global_batch"] == 2


def test_sampler_order_depends_on_seed_and_epoch_only():
    buckets = [(512, 512)] * 7 + [(624, 416)] * 6
    a, b = BucketBatchSampler(buckets, 2, seed=1), BucketBatchSampler(buckets, 2, seed=1)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 3) != epoch_batches(a, 4)
    assert epoch_batches(a, 3) != epoch_batches(BucketBatchSampler(buckets, 2, seed=2), 3)


def global_steps(samplers, accum, epochs):
    """Per optimizer step, the samples it trains on (sorted) and the bucket of each per-process
    batch. `samplers[r]` is the one process r builds; accelerate's own `BatchSamplerShard` deals
    its batches to r, as `accelerator.prepare` does; `accum` batches per process per step."""
    from accelerate.data_loader import BatchSamplerShard

    processes = len(samplers)
    shards = [BatchSamplerShard(s, processes, rank, split_batches=False, even_batches=True)
              for rank, s in enumerate(samplers)]
    n = len(samplers[0].buckets)
    steps = []
    for epoch in range(epochs):
        per_rank = []
        for sampler, shard in zip(samplers, shards):
            sampler.set_epoch(epoch)
            per_rank.append(list(shard))
        assert len({len(batches) for batches in per_rank}) == 1, "a process would wait for the others"
        assert len(per_rank[0]) % accum == 0, "a step would span two epochs"
        for k in range(0, len(per_rank[0]), accum):
            batches = [b for rank in per_rank for b in rank[k:k + accum]]
            steps.append((sorted(i for b in batches for i in b),
                          [{samplers[0].buckets[i % n] for i in b} for b in batches]))
    return steps


def split_steps(buckets, seed, batch, processes, accum, epochs=4):
    return global_steps([BucketBatchSampler(buckets, batch, seed, processes, accum) for _ in range(processes)],
                        accum, epochs)


# (batch per process, processes, accumulation steps): each a global batch of 4, or of 6
SPLITS_4 = [(4, 1, 1), (2, 2, 1), (1, 2, 2), (1, 1, 4), (1, 4, 1), (2, 1, 2)]
SPLITS_6 = [(6, 1, 1), (3, 2, 1), (1, 3, 2), (2, 3, 1), (1, 2, 3), (1, 6, 1)]
# uneven sizes (none divides by 4 or 6), one to three buckets, repeats as the run lays them out
DATASETS = {
    "one bucket, 7 images": [(64, 64)] * 7,
    "three buckets, 11 images": [(64, 64)] * 5 + [(80, 48)] * 4 + [(48, 80)] * 2,
    "two buckets, 5 images x 3 repeats": ([(64, 64)] * 3 + [(80, 48)] * 2) * 3,
}


@pytest.mark.parametrize("splits", [SPLITS_4, SPLITS_6], ids=["global4", "global6"])
@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_split_of_the_global_batch_trains_the_same_samples_at_every_step(splits, name, seed):
    buckets = DATASETS[name]
    runs = {split: split_steps(buckets, seed, *split) for split in splits}
    reference = [samples for samples, _ in runs[splits[0]]]
    for split, steps in runs.items():
        assert [samples for samples, _ in steps] == reference, f"batch {split[0]} x {split[1]} processes x accum {split[2]}"
        for _, batch_buckets in steps:
            assert len(set().union(*batch_buckets)) == 1  # one size per batch, and per step
    per_epoch = len(reference) // 4
    for epoch in range(4):  # every image in every epoch, and each repeat under its own index
        flat = [i for samples in reference[epoch * per_epoch:(epoch + 1) * per_epoch] for i in samples]
        assert {i % len(buckets) for i in flat} == set(range(len(buckets))) and len(set(flat)) == len(flat)


def test_the_comparison_catches_a_per_process_shuffle_and_per_process_batching():
    """Mutations of the order the test above must tell apart from the real one."""
    buckets = DATASETS["three buckets, 11 images"]
    one = [samples for samples, _ in split_steps(buckets, 0, 4, 1, 1)]
    assert one == [samples for samples, _ in split_steps(buckets, 0, 2, 2, 1)]
    # each process shuffles with a seed of its own
    own_seeds = [BucketBatchSampler(buckets, 2, 1000 * rank, 2, 1) for rank in range(2)]
    assert [samples for samples, _ in global_steps(own_seeds, 1, epochs=4)] != one
    # batches formed per process (of 2) and shuffled, then dealt out: the order before this sampler
    per_process = [BucketBatchSampler(buckets, 2, 0, 1, 1) for _ in range(2)]
    assert [samples for samples, _ in global_steps(per_process, 1, epochs=4)] != one


def test_summary_counts_global_batches_for_the_processes_and_accumulation():
    buckets = [(512, 512)] * 5 + [(624, 416)] * 3 + [(416, 624)] * 1
    summary = BucketBatchSampler(buckets, batch_size=2, seed=0, num_replicas=2, grad_accum=2).summary()
    assert summary["global_batch"] == 8 and summary["steps_per_epoch"] == 3
    assert summary["buckets"]["512x512"] == {"images": 5, "batches": 1, "repeated": 3}
    assert len(BucketBatchSampler(buckets, 2, 0, 2, 2)) == 3 * 2 * 2  # batches for all processes together


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
    from fluxtune.data.images import image_size
    from fluxtune.data.sources import bucket_targets, scan_image_folder
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
