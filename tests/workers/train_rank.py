"""Run by `accelerate launch` in tests: trains with the given overrides, then every rank saves its
own copy of the LoRA weights to <output_dir>/rank<i>.safetensors, its cache counts to
<output_dir>/rank<i>-cache.json and how many base weights it holds to <output_dir>/rank<i>-base.json,
so a test can compare ranks.

    accelerate launch ... tests/workers/train_rank.py key=value ...
"""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from fluxtune.config import load_config
from fluxtune.train import train

torch.set_num_threads(1)
cfg = load_config(None, sys.argv[1:])
# A fault a test injects on one rank, at that rank's n-th loss (FAULT_AT_CALL, else the default
# here): NaN (as from a bad batch) or SIGTERM.
FAULTS = {"NAN_ON_RANK": 3, "SIGTERM_ON_RANK": 2}
faults = [(name, int(os.environ.get("FAULT_AT_CALL", at))) for name, at in FAULTS.items()
          if os.environ.get(name) == os.environ.get("RANK")]
if faults:
    import signal

    import fluxtune.train as train_module

    (fault, at), = faults
    real_loss, calls = train_module.batch_loss, {"n": 0}

    def faulty_loss(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at and fault == "NAN_ON_RANK":
            return loss * float("nan")
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    train_module.batch_loss = faulty_loss
if os.environ.get("SHUFFLE_PER_RANK"):  # a mutation: each process orders the data with its own seed
    import fluxtune.data.loader as run_data

    class PerRankOrder(run_data.BucketBatchSampler):
        def __init__(self, buckets, batch_size, seed, *args):
            super().__init__(buckets, batch_size, seed + 1000 * int(os.environ["RANK"]), *args)

    run_data.BucketBatchSampler = PerRankOrder


result = train(cfg)
from accelerate import PartialState  # noqa: E402  (the state exists once train() has run)

rank = PartialState().process_index
weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(result.transformer).items()}
save_file(weights, str(Path(cfg.output_dir) / f"rank{rank}.safetensors"))
(Path(cfg.output_dir) / f"rank{rank}-cache.json").write_text(json.dumps(asdict(result.cache)))
# How much of the frozen base this rank holds (all of it unless train.sharding split it).
frozen = [p for n, p in result.transformer.named_parameters() if "lora_" not in n]
held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in frozen)
(Path(cfg.output_dir) / f"rank{rank}-base.json").write_text(json.dumps({"held": held, "total": sum(p.numel() for p in frozen)}))
