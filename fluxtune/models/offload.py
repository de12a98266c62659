"""Block swap and regional compilation for the FLUX transformer's repeated blocks.

    swap = BlockSwap(transformer, 10, offload=torch.device("cpu"), compute=torch.device("cuda"))
    compile_blocks(transformer)          # train.compile: one torch.compile per block, not per model

Block swap keeps the frozen weights of the last K blocks (counted over `transformer_blocks` then
`single_transformer_blocks`) on the offload device and streams each block to the compute device
only while it computes, so a bf16 FLUX.1-dev LoRA fits a 16-24 GB card. How:

- Each frozen parameter of a swapped block keeps a master copy on the offload device (pinned when
  the compute device is CUDA, so copies are asynchronous); `param.data` points at it between uses.
  The block's LoRA parameters are trainable, tiny and stay on the compute device: the optimizer
  never sees a parameter move. Frozen weights never change, so nothing is ever copied back.
- Forward: a forward pre-hook copies the block's frozen weights to the compute device (on a side
  CUDA stream, which the compute stream then waits for) and points `param.data` at the copies; a
  forward hook points them back at the masters.
- Backward: autograd saves the weight (or a view of it) of every matmul whose input needs a
  gradient, and those saved references would keep every block's copy alive until backward, which
  is the whole memory this is meant to save. So while the transformer runs forward, a
  `torch.autograd.graph.saved_tensors_hooks` pair turns any saved tensor whose storage is a swapped
  weight's copy into a token (which weight, view geometry). In backward the unpack hook copies that
  weight to the compute device again and returns the same view; the copy lives only while the
  backward node that asked for it runs. This is correct whatever order autograd runs its nodes in,
  with no backward hooks to keep in step.
- Gradient checkpointing (diffusers' non-reentrant `torch.utils.checkpoint`): checkpoint pushes
  its own saved-tensor hooks inside ours, and the innermost pair wins, so the first forward saves
  nothing of the block. In backward the block's forward runs again (our forward hooks load it),
  and checkpoint keeps exactly that block's copies until its backward has used them. Our pair is
  only active during the transformer's forward, so nothing recomputed is tokenised.

The device pair is a parameter: tests run it with CPU as both devices (every copy is still a real,
separate tensor) and compare losses and gradients with an unswapped run.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from fluxtune.errors import UserError

log = logging.getLogger("fluxtune")

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The double-stream then single-stream blocks, in the order the forward runs them."""
    return [block for name in BLOCK_LISTS for block in getattr(transformer, name)]


def compile_blocks(transformer: torch.nn.Module) -> None:
    """Regional compilation: every block has the same code, so one compiled graph is reused for
    all of them (compile time of one block, not of the whole model), and LoRA, hooks and
    checkpointing between blocks stay plain Python."""
    for block in repeated_blocks(transformer):
        block.compile()


def check_swap_count(transformer: torch.nn.Module, count: int) -> None:
    """ValueError unless 0 < count <= the number of blocks; the message names the counts."""
    blocks = len(repeated_blocks(transformer))
    if not 0 < count <= blocks:
        raise ValueError(f"{count} blocks to swap, but the transformer has {blocks} "
                         f"({len(transformer.transformer_blocks)} double + "
                         f"{len(transformer.single_transformer_blocks)} single)")


@dataclass(frozen=True)
class _Token:
    """What autograd keeps instead of a swapped weight: which one, and the view it saved."""

    weight: "_Weight"
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class _Weight:
    """One frozen parameter of a swapped block: its master copy and where it is used from."""

    def __init__(self, block: int, param: torch.nn.Parameter, offload: torch.device, pin: bool):
        self.block = block
        self.param = param
        master = param.data.to(offload, copy=True)
        self.master = master.pin_memory() if pin else master
        param.data = self.master


class BlockSwap:
    """Streams the frozen weights of the last `count` blocks between `offload` and `compute`.

    Moves everything else of the transformer (LoRA included) to `compute`. `forward_loads` and
    `backward_fetches` count, per block index, the loads by the forward pre-hook and the weights
    fetched back by autograd: they show that the swap really ran.
    """

    def __init__(self, transformer: torch.nn.Module, count: int, *, offload: torch.device, compute: torch.device):
        check_swap_count(transformer, count)
        blocks = repeated_blocks(transformer)
        self.offload, self.compute = torch.device(offload), torch.device(compute)
        cuda = self.compute.type == "cuda"
        self._stream = torch.cuda.Stream(self.compute) if cuda else None
        pin = cuda and self.offload.type == "cpu"
        self.swapped = list(range(len(blocks) - count, len(blocks)))
        self._weights = {
            i: [_Weight(i, p, self.offload, pin) for p in blocks[i].parameters() if not p.requires_grad]
            for i in self.swapped
        }
        _move_except(transformer, self.compute, {id(w.param) for ws in self._weights.values() for w in ws})
        self._resident: dict[tuple[torch.device, int], _Weight] = {}
        self.forward_loads: Counter[int] = Counter()
        self.backward_fetches: Counter[int] = Counter()
        for i in self.swapped:
            blocks[i].register_forward_pre_hook(self._loader(i))
            blocks[i].register_forward_hook(self._unloader(i), always_call=True)
        self._saving = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        transformer.register_forward_pre_hook(lambda *_: self._saving.__enter__())
        transformer.register_forward_hook(lambda *_: self._saving.__exit__(None, None, None), always_call=True)

    def _loader(self, i: int):
        def load(module, args):
            self.forward_loads[i] += 1
            weights = self._weights[i]
            for w, copy in zip(weights, self._copies(weights)):
                w.param.data = copy
                self._resident[_key(copy)] = w
        return load

    def _unloader(self, i: int):
        def unload(module, args, output):
            for w in self._weights[i]:
                self._resident.pop(_key(w.param.data), None)
                w.param.data = w.master
        return unload

    def _copies(self, weights: list[_Weight]) -> list[torch.Tensor]:
        """Compute-device copies of the masters; on CUDA, copied on the side stream."""
        if self._stream is None:
            return [w.master.to(self.compute, copy=True) for w in weights]
        here = torch.cuda.current_stream(self.compute)
        with torch.cuda.stream(self._stream):
            copies = [w.master.to(self.compute, non_blocking=True, copy=True) for w in weights]
        here.wait_stream(self._stream)
        for c in copies:
            c.record_stream(here)  # allocated on the side stream, used and freed on this one
        return copies

    def _pack(self, tensor: torch.Tensor):
        weight = self._resident.get(_key(tensor))
        if weight is None:
            return tensor
        return _Token(weight, tensor.size(), tensor.stride(), tensor.storage_offset())

    def _unpack(self, saved):
        if not isinstance(saved, _Token):
            return saved
        self.backward_fetches[saved.weight.block] += 1
        (copy,) = self._copies([saved.weight])
        return copy.as_strided(saved.size, saved.stride, saved.offset)


def _key(tensor: torch.Tensor) -> tuple[torch.device, int]:
    return tensor.device, tensor.untyped_storage().data_ptr()


def _move_except(module: torch.nn.Module, device: torch.device, keep: set[int]) -> None:
    """`module.to(device)` for all but the `keep` parameters (by id), which stay where they are;
    moving the whole model first would need the very memory block swap is there to save."""
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            if id(p) not in keep:
                p.data = p.data.to(device)
        for name, buffer in sub.named_buffers(recurse=False):
            sub._buffers[name] = buffer.to(device)


def blocks_to_swap(count: int, transformer: torch.nn.Module, device: torch.device, processes: int) -> int:
    """train.blocks_to_swap, checked against the model, or 0 where there is no GPU to swap to."""
    if not count:
        return 0
    try:
        check_swap_count(transformer, count)
    except ValueError as e:
        raise UserError(f"train.blocks_to_swap: {e}; lower it") from None
    if device.type != "cuda":
        log.info("train.blocks_to_swap=%d has no effect on %s: there is no GPU to swap to", count, device)
        return 0
    if processes > 1:
        raise UserError("train.blocks_to_swap: works with one process only (data parallel needs every weight "
                        "on its GPU); launch one process or set train.blocks_to_swap=0")
    return count
