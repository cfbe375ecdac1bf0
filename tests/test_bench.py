"""`rrcm bench` on the CPU: the report and its JSON, the FLOP count, the reference loop, bad input. No timings
are asserted (other jobs share these cores); sizes are tiny and every timed configuration runs a few batches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from rrcm.classifier import NoisyImageClassifier
from rrcm.cli import main
from rrcm.engine import bench, throughput
from rrcm.model import Classifier
from rrcm.presets import get_preset

TINY_ARGS = ["bench", "--preset", "tiny", "--device", "cpu", "--n", "1000", "--seconds", "0.05"]


def test_tiny_preset_table_and_json(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    assert main([*TINY_ARGS, "--configs", "reference,fp32,bf16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| configuration | batch | samples/s | s/image at n=1,000 | speedup | % of limit (dtype) | warm-up s |" in printed
    for row in ("| reference | 400 |", "| fp32 | 128 |", "| bf16 | 128 |"):
        assert row in printed

    result = json.loads(out.read_text())
    assert result["device"]["type"] == "cpu" and result["device"]["name"] and isinstance(result["device"]["features"], list)
    assert {"rrcm", "torch", "threads", "load_average", "load_average_end", "time"} <= result.keys()
    model = result["model"]
    assert model["name"] == "tiny" and model["weights"] == "random" and model["sigma"] == 0.5
    assert model["parameters"] == sum(p.numel() for p in Classifier(get_preset("tiny")).parameters())
    assert model["flop_per_sample"] == 723_584  # see test_flop_count_by_hand
    assert set(result["peak_flops"]) == {"float32", "bfloat16"} and all(v > 0 for v in result["peak_flops"].values())
    configs = {c["name"]: c for c in result["configurations"]}
    assert list(configs) == ["reference", "fp32", "bf16"]
    for name, c in configs.items():
        rate = c["samples_per_s"]
        assert rate > 0 and c["samples_per_call"] % c["batch"] == 0 and len(c["call_s"]) == throughput.ROUNDS
        assert c["s_per_image_at_n"] == pytest.approx(1000 / rate)
        assert c["speedup"] == pytest.approx(rate / configs["reference"]["samples_per_s"])
        limit = result["peak_flops"][c["dtype"]] / model["flop_per_sample"]
        assert c["limit_samples_per_s"] == pytest.approx(limit) and c["fraction_of_limit"] == pytest.approx(rate / limit)
        assert c["warmup_s"] > 0 and c["ran"]["device"] == "cpu"
    assert configs["reference"]["speedup"] == 1.0 and configs["reference"]["ran"]["batch"] == bench.REFERENCE_BATCH
    assert configs["bf16"]["dtype"] == "bfloat16" and configs["bf16"]["ran"]["dtype"] == "bfloat16"
    assert configs["fp32"]["ran"]["backend"] == "torch" and configs["fp32"]["options"] == {}


def test_a_failing_configuration_leaves_the_others(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.CONFIGS["cpu"], "broken", {"sampler": "no-such-sampler"})
    out = tmp_path / "throughput.json"
    assert main([*TINY_ARGS, "--configs", "broken,fp32", "--json", str(out)]) == 1
    assert "| broken | - | failed:" in capsys.readouterr().out
    broken, fp32 = json.loads(out.read_text())["configurations"]
    assert "no-such-sampler" in broken["error"] and "samples_per_s" not in broken
    assert fp32["samples_per_s"] > 0 and fp32["speedup"] is None  # no reference was timed


def test_flop_count_by_hand():
    """Multiply-accumulates of the tiny ViT (28 px, patch 7, width 32, 2 blocks, 2 heads, MLP 64, 10 classes)."""
    tokens, patches, width, heads, hidden = 18, 16, 32, 2, 64  # 16 patches + cls + time token
    patch_embed = patches * (7 * 7) * width
    block = (tokens * width * 3 * width  # qkv, no bias
             + 2 * heads * tokens * tokens * (width // heads)  # q k^T and attention times v
             + tokens * width * width  # output projection
             + 2 * tokens * width * hidden)  # MLP
    head = width * 10
    with torch.device("meta"):
        model = NoisyImageClassifier(Classifier(get_preset("tiny")), 0.5)
    assert throughput.count_flops(model, (1, 28, 28)) == 2 * (patch_embed + 2 * block + head)
    assert throughput.count_flops(nn.Linear(7, 3), (7,)) == 2 * 7 * 3


def test_reference_loop_counts_every_sample_in_batches_of_the_reference():
    calls = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        logits = torch.zeros(len(x), 10)
        logits[:, 3] = 1
        return logits

    counts = throughput.reference_sampler(model, torch.rand(1, 4, 4), 0.5, 10, batch=400)(1000)
    assert calls == [400, 400, 200] and counts.tolist() == [0, 0, 0, 1000, 0, 0, 0, 0, 0, 0]


def test_timed_calls_are_whole_batches():
    asked = []
    timing = throughput.time_sampler(asked.append, 64, 0.01, torch.device("cpu"))
    assert asked[:2] == [64, 64] and len(asked) == 2 + throughput.ROUNDS
    assert all(n == timing.samples_per_call and n % 64 == 0 for n in asked[2:])
    assert timing.samples_per_s == pytest.approx(timing.samples_per_call / np.median(timing.call_s))


def test_configuration_tables():
    assert throughput.select_configs(torch.device("cpu"), None) == ["reference", *bench.CONFIGS["cpu"]]
    assert throughput.select_configs(torch.device("cpu"), "fp32, reference,fp32") == ["fp32", "reference"]
    assert throughput.config_dtype("reference", torch.device("cpu")) == "float32"
    assert throughput.config_dtype("bf16", torch.device("cpu")) == "bfloat16"
    assert list(bench.REFERENCES["cuda"].values()) == ["float32", "tf32"]
    for name, options in bench.CONFIGS["cuda"].items():  # what the GPU run will pass to Certifier
        assert set(throughput.certifier_options(options)) <= {"dtype", "compile", "cuda_graphs", "sampler", "backend"}, name
    assert throughput.certifier_options({"dtype": "float8_e4m3fn"}) == {"dtype": torch.float8_e4m3fn}


@pytest.mark.parametrize("args, message", [
    (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["--preset", "tiny", "--n", "0"], "--n must be >= 1"),
    (["--preset", "tiny", "--seconds", "-1"], "--seconds must be a number in (0, 3600]"),
    (["--preset", "tiny", "--seconds", "1e23"], "--seconds must be a number in (0, 3600]"),
    (["--preset", "tiny", "--batch", "0"], "--batch must be >= 1"),
    (["--preset", "tiny", "--sigma", "nan"], "--sigma must be a positive number"),
    (["--preset", "tiny", "--configs", "fp32,warp-drive"], "unknown configuration(s) warp-drive on cpu"),
    (["--preset", "tiny", "--json", "/etc/passwd/b.json"], "/etc/passwd is a file, not a folder"),
    (["--model", "clf.onnx"], "not an exported file"),
    (["--model", "/no/such/checkpoint"], "no such checkpoint folder"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    assert main(["bench", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrcm: error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_preset_and_model_exclude_each_other(capsys):
    assert main(["bench", "--preset", "tiny", "--model", "fashion-mnist"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_lists_the_configurations(capsys):
    assert main(["--help"]) == 0 and "bench" in capsys.readouterr().out
    assert main(["bench", "--help"]) == 0
    assert "cuda: reference, reference-tf32, fp32, bf16" in " ".join(capsys.readouterr().out.split())


def test_a_checkpoint_keeps_its_weights_and_sigma(tmp_path):
    out = tmp_path / "throughput.json"
    assert main(["bench", "--model", "fashion-mnist", "--sigma", "0.25", "--device", "cpu", "--configs", "fp32",
                 "--seconds", "0.05", "--json", str(out)]) == 0
    model = json.loads(out.read_text())["model"]
    assert (model["name"], model["weights"], model["sigma"], model["input_shape"]) == ("fashion-mnist", "trained", 0.25, [1, 28, 28])
    with torch.device("meta"):
        counted = NoisyImageClassifier(Classifier(get_preset("fmnist-xs")), 0.25)
    assert model["flop_per_sample"] == throughput.count_flops(counted, (1, 28, 28))
