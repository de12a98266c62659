"""LoRA files: the adapter on a transformer (peft), the layouts tools read (diffusers, ComfyUI,
kohya) converted exactly, export with a model card, and the `fluxtune lora` tools.

May import `fluxtune.models` (a family for checks and merges) and `fluxtune.errors`; never
`data`, `training` or the recipe level.
"""
