"""scripts/bench_train.py runs in-process on a tiny checkpoint and on a scaled real architecture."""

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fluxtune.models.tiny import make_tiny

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.fixture
def bench(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # One thread: on a busy 2-core machine two OpenMP threads make these small steps up to 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


def _run(bench, out: Path, *argv: str) -> dict:
    bench.main([*argv, "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["mean_s_per_step"] > 0 and figures["median_s_per_step"] > 0
    assert figures["model_flops_per_step"] > figures["forward_flops"] > 0
    assert figures["achieved_tflops"] > 0 and figures["peak_memory_bytes"] > 0
    return figures


def test_bench_tiny_and_scaled_arch(bench, tmp_path):
    tiny = make_tiny("flux2-klein", tmp_path / "klein")
    figures = _run(bench, tmp_path / "tiny.json", "--model", str(tiny), "--resolution", "64",
                   "--steps", "2", "--warmup", "1")
    assert len(figures["step_times_s"]) == 2
    assert (figures["image_tokens"], figures["text_tokens"]) == (16, 512)  # (64/16)^2, klein's max_sequence_length

    # The analytic count: grows with resolution, and agrees with torch's own count of a real step
    # (the math SDPA backend, so that the counter sees attention as matmuls).
    cpu = torch.device("cpu")
    family, transformer, params, _ = bench.build(bench.parse_args(["--model", str(tiny)]), cpu, torch.float32)
    flops = {}
    for res in (64, 128):
        latents, text = bench.fake_batch(family, transformer, 1, res, cpu)
        flops[res] = bench.step_flops(transformer, family.pack(latents).shape[1], family.max_sequence_length)
    assert flops[128]["model"] > flops[64]["model"] > 0
    optimizer = torch.optim.AdamW(params)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        bench.train_step(family, transformer, optimizer, latents, text, torch.Generator(), contextlib.nullcontext())
    assert flops[128]["model"] == pytest.approx(counter.get_total_flops(), rel=0.1)

    # Real FLUX.1-dev width, 1 double + 1 single block; a short text keeps the step fast on CPU.
    arch = _run(bench, tmp_path / "arch.json", "--arch", "flux1-dev", "--layers-scale", "0.03",
                "--resolution", "64", "--steps", "1", "--warmup", "0", "--text-len", "64")
    assert "SCALED" in arch["model"] and (arch["image_tokens"], arch["text_tokens"]) == (16, 64)
    assert 4e8 < arch["params_total"] < 7e8  # 3072-wide blocks: ~0.34B double, ~0.14B single, plus embedders


def test_data_benchmark_reports_every_stage(capsys):
    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).parent.parent / "scripts" / "bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--images", "6", "--resolution", "64"])
    out = capsys.readouterr().out
    for stage in ["validate (full decode)", "scan (header checks)", "bucket", "cache, cold", "cache, warm"]:
        line = next(line for line in out.splitlines() if line.startswith(stage))
        assert "6 images" in line and float(line.split()[-2]) > 0, line


def test_bench_quantized_base_loads_through_the_family(bench, tmp_path, capsys, monkeypatch):
    """--quantize with --arch writes the random weights as a checkpoint and loads them the way
    training does; fp8 (torchao) runs on a CPU, nf4/int8 stop at once without a GPU. The
    architecture is a narrow klein (2 heads, one block of each kind) to keep fp8 on a CPU quick."""
    monkeypatch.setitem(bench.ARCHS, "narrow-klein", ("Flux2KleinPipeline", bench._flux2(1, 1, 2, 192, False),
                                                      bench._text(64, 36)))
    figures = _run(bench, tmp_path / "fp8.json", "--arch", "narrow-klein", "--resolution", "32", "--text-len", "8",
                   "--steps", "1", "--warmup", "0", "--quantize", "fp8")
    assert figures["quantize"] == "fp8" and "base quantized fp8" in figures["model"]
    assert "blocks fp8" in capsys.readouterr().out
    tiny = make_tiny("flux2-klein", tmp_path / "klein")
    _, transformer, _, _ = bench.build(bench.parse_args(["--model", str(tiny), "--quantize", "fp8"]),
                                       torch.device("cpu"), torch.float32)
    weight = transformer.transformer_blocks[0].attn.to_q.base_layer.weight  # LoRA wraps the quantized Linear
    assert type(weight).__name__ == "Float8Tensor" and weight.qdata.dtype == torch.float8_e4m3fn
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--arch", "flux1-dev", "--quantize", "nf4"])
        assert "needs a CUDA GPU" in capsys.readouterr().err
