"""The training loop's parts: flow-matching math, the objective, optimizers and schedules, EMA,
atomic checkpoints, evaluation, tracking (W&B, TensorBoard, a metrics file) and sampling, during
training and for `fluxtune generate`.

May import `fluxtune.models`, `fluxtune.lora` and `fluxtune.errors`; never `data` or the recipe
level (`train.py`, which puts all the stages together, and `cli.py`).
"""
