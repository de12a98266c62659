"""The data side: from image folders, manifests and datasets to cached batches.

`sources` lists the images and captions of folders, `metadata.jsonl` manifests and Hugging Face
datasets; `images` checks and opens each file (what `fluxtune data validate` reports is what
training does); `captions` picks the caption a sample trains with in an epoch; `buckets` groups
images by aspect ratio and orders the global batches; `cache` encodes latents and text once;
`loader` puts them together for a run.

May import `fluxtune.models` (a family encodes the images and captions) and `fluxtune.errors`;
never `lora`, `training` or the recipe level, and never the whole config (it takes sections).
"""
