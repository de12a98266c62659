"""Block swap and compiled blocks (fluxtune/models/offload.py) on tiny real transformers.

On CPU the swap runs with CPU as both the offload and the compute device: every copy is still a
separate tensor, so losses and gradients must match an unswapped run bit for bit. The `gpu` tests
check real CUDA memory and compiled training: `pytest -m gpu tests/test_offload.py`.
"""

import logging

import pytest
import torch

from fluxtune.cli import main
from fluxtune.config import ConfigError, load_config
from fluxtune.models.families import load_family
from fluxtune.lora.adapter import add_lora, resolve_targets
from fluxtune.training.objective import batch_loss
from fluxtune.models.offload import BlockSwap, compile_blocks, repeated_blocks

CPU = torch.device("cpu")
# (latent channels, latent side, text width) of a 64x64 image for each tiny family
SHAPES = {"flux1": (16, 8, 64), "flux2-klein": (128, 4, 192)}


def gpu(test):
    """Runs only where torch sees a CUDA GPU; select these with `pytest -m gpu`."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


def lora_model(tiny_models, kind, checkpointing, device=CPU):
    family = load_family(str(tiny_models(kind)))
    torch.manual_seed(0)
    transformer = family.load_transformer(torch.float32)
    add_lora(transformer, rank=4, alpha=4, targets=resolve_targets(family, "attention"))
    torch.manual_seed(1)  # non-zero LoRA B, so the LoRA changes the output and every gradient is non-trivial
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    # safetensors maps weights at unaligned addresses, and CPU matmuls sum in another order for the
    # aligned copies the swap makes: the same weights, freshly allocated, compare bit for bit
    for p in transformer.parameters():
        p.data = p.data.clone()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return family, transformer.to(device)


def batch(kind):
    channels, side, width = SHAPES[kind]
    g = torch.Generator().manual_seed(2)
    text = {"prompt_embeds": torch.randn(1, 6, width, generator=g), "pooled_prompt_embeds": torch.randn(1, 64, generator=g)}
    return {"latents": torch.randn(1, channels, side, side, generator=g), "text": text}


def step(family, transformer, kind, device=CPU):
    """One forward and backward; the loss and the LoRA gradients."""
    transformer.zero_grad(set_to_none=True)
    loss = batch_loss(family, transformer, batch(kind), generator=torch.Generator().manual_seed(3), sigmas=torch.tensor([0.6]),
                      guidance=1.0,
                      device=device)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["flux1", "flux2-klein"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("count", [1, 2])
def test_block_swap_gives_identical_loss_and_gradients(tiny_models, kind, checkpointing, count):
    family, plain = lora_model(tiny_models, kind, checkpointing)
    want_loss, want_grads = step(family, plain, kind)

    _, swapped = lora_model(tiny_models, kind, checkpointing)
    swap = BlockSwap(swapped, count, offload=CPU, compute=CPU)
    for n in (1, 2):  # a second step: the hooks leave everything as the first step found it
        loss, grads = step(family, swapped, kind)
        assert not swap._resident  # no compute-device copy is registered between steps
        assert torch.equal(loss, want_loss)
        assert grads.keys() == want_grads.keys() and all(torch.equal(grads[k], want_grads[k]) for k in grads)

        blocks = len(repeated_blocks(swapped))
        assert swap.swapped == list(range(blocks - count, blocks))
        # checkpointing runs each block's forward again in backward, where checkpoint (not our
        # hooks) keeps the weights; without it autograd fetches them back through our unpack hook
        assert swap.forward_loads == {i: n * (2 if checkpointing else 1) for i in swap.swapped}
        if checkpointing:
            assert not swap.backward_fetches
        else:
            assert set(swap.backward_fetches) == set(swap.swapped)
    for i, block in enumerate(repeated_blocks(swapped)):
        for p in block.parameters():
            weight = swap._weights.get(i)
            if p.requires_grad or weight is None:
                continue
            # between steps every frozen weight of a swapped block is its master on the offload device
            assert any(w.param is p and p.data.data_ptr() == w.master.data_ptr() for w in weight)
            assert p.device == CPU


def test_block_swap_keeps_lora_and_unswapped_blocks_in_place(tiny_models):
    _, transformer = lora_model(tiny_models, "flux1", False)
    swap = BlockSwap(transformer, 1, offload=CPU, compute=CPU)
    last = repeated_blocks(transformer)[-1]
    frozen = {id(p) for p in last.parameters() if not p.requires_grad}
    assert {id(w.param) for w in swap._weights[swap.swapped[0]]} == frozen
    assert all(p.requires_grad for p in last.parameters() if id(p) not in frozen)  # LoRA never moves


def test_block_swap_refuses_more_blocks_than_the_transformer_has(tiny_models):
    _, transformer = lora_model(tiny_models, "flux1", False)
    with pytest.raises(ValueError, match=r"3 blocks to swap, but the transformer has 2 \(1 double \+ 1 single\)"):
        BlockSwap(transformer, 3, offload=CPU, compute=CPU)


def test_compile_blocks_compiles_every_block_without_running(tiny_models):
    _, transformer = lora_model(tiny_models, "flux2-klein", False)
    compile_blocks(transformer)
    assert all(block._compiled_call_impl is not None for block in repeated_blocks(transformer))
    assert transformer._compiled_call_impl is None  # regional: the model itself is not compiled


def run_args(model, photos, tmp_path, **extra):
    items = {"output_dir": tmp_path / "run", "model.path": model, "data.path": photos, "data.resolution": 64,
             "data.cache_dir": tmp_path / "cache", "train.max_steps": 2, "lora.rank": 4, **extra}
    return [f"{k}={v}" for k, v in items.items()]


@pytest.mark.parametrize("extra,message", [
    ({"train.compile": "true"}, "train.compile: cannot be combined with train.blocks_to_swap (1)"),
    ({"model.quantize": "fp8"}, "model.quantize: fp8 cannot be combined with train.blocks_to_swap (1)"),
    ({"sample.every": 5, "sample.prompts": "[a cat]"}, "sample.every: in-training samples would load the whole"),
])
def test_config_refuses_what_block_swap_cannot_run_with(extra, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, run_args("m", "d", tmp_path, **{"train.blocks_to_swap": 1, **extra}))
    assert message in str(e.value)


def test_training_checks_the_swap_count_then_skips_swapping_without_gpu(tiny_models, photos, tmp_path, capsys, caplog):
    model = tiny_models("flux1")
    assert main(["train", "/dev/null", *run_args(model, photos, tmp_path, **{"train.blocks_to_swap": 3})]) == 1
    assert "train.blocks_to_swap: 3 blocks to swap, but the transformer has 2 (1 double + 1 single)" in capsys.readouterr().err

    with caplog.at_level(logging.INFO, logger="fluxtune"):
        args = run_args(model, photos, tmp_path, **{"train.blocks_to_swap": 2, "output_dir": tmp_path / "run2"})
        assert main(["train", "/dev/null", *args]) == 0
    assert "train.blocks_to_swap=2 has no effect on cpu: there is no GPU to swap to" in caplog.text


@gpu
@pytest.mark.parametrize("setting", [{"train.blocks_to_swap": 2, "train.gradient_checkpointing": "true"},
                                     {"train.compile": "true"}])
def test_gpu_training_runs_with_block_swap_or_compiled_blocks(setting, tiny_models, photos, tmp_path):
    assert main(["train", "/dev/null", *run_args(tiny_models("flux1"), photos, tmp_path, **setting)]) == 0
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()


def peak_step(family, transformer, kind, device):
    """Loss and gradients (on CPU, so they do not count in the next measurement) and the peak
    memory of one step; the math attention kernel, as the fused ones may sum in any order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel(SDPBackend.MATH):
        loss, grads = step(family, transformer, kind, device)
    torch.cuda.synchronize()
    return loss.cpu(), {k: g.cpu() for k, g in grads.items()}, torch.cuda.max_memory_allocated()


@gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpu_block_swap_lowers_peak_memory_with_identical_gradients(tiny_models, checkpointing):
    cuda = torch.device("cuda")
    family, plain = lora_model(tiny_models, "flux1", checkpointing, cuda)
    want_loss, want_grads, plain_peak = peak_step(family, plain, "flux1", cuda)
    del plain
    torch.cuda.empty_cache()

    _, swapped = lora_model(tiny_models, "flux1", checkpointing)
    swap = BlockSwap(swapped, 2, offload=CPU, compute=cuda)
    loss, grads, peak = peak_step(family, swapped, "flux1", cuda)
    assert torch.equal(loss, want_loss)
    assert all(torch.equal(grads[k], want_grads[k]) for k in want_grads)
    assert peak < plain_peak
    assert all(w.param.device == CPU and w.param.is_pinned() for ws in swap._weights.values() for w in ws)


@gpu
def test_gpu_compiled_blocks_train_like_plain_ones(tiny_models):
    cuda = torch.device("cuda")
    losses = {}
    for compiled in (False, True):
        family, transformer = lora_model(tiny_models, "flux1", False, cuda)
        if compiled:
            compile_blocks(transformer)
        optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-3)
        losses[compiled] = []
        for _ in range(2):
            loss, _ = step(family, transformer, "flux1", cuda)
            optimizer.step()
            losses[compiled].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
