"""CPU features (rrcm.cpu) and what the engine decides from them: int8 activation bits, the bf16 cost warning,
and `--precision auto`'s runtime probe with its cache."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings

import pytest
import torch

from rrcm import load_classifier
from rrcm.cli import main
from rrcm.cpu import CpuInfo, cpu_info, parse_cpuinfo, read_cpu
from rrcm.engine import autoselect, backends
from rrcm.engine.backends import TorchBackend
from rrcm.engine.quantize import activation_bits
from rrcm.errors import PerformanceWarning, UserError

pytestmark = pytest.mark.usefixtures("one_thread")

AVX512 = "avx512f avx512bw avx512vl avx512dq"
CPUINFO = {  # /proc/cpuinfo as Linux writes it (two processors; the first one counts), flags abridged
    "zen3": f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD Ryzen 9 5950X 16-Core Processor\n"
            f"flags\t\t: fpu sse4_2 avx fma avx2 bmi2\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: {AVX512}\n",
    "skylake": f"model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\nflags\t\t: avx fma avx2 {AVX512}\n",
    "cooper": f"model name\t: Intel(R) Xeon(R) Platinum 8380H\nflags\t\t: avx2 fma {AVX512} avx512_vnni avx512_bf16\n",
    "sapphire": f"model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 fma {AVX512} avx512_vnni avx512_bf16 "
                "amx_bf16 amx_tile amx_int8 avx_vnni\n",
    "alderlake": "model name\t: 12th Gen Intel(R) Core(TM) i7-12700\nflags\t\t: avx2 fma avx_vnni\n",
    "arm": "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes crc32 bf16 i8mm\nCPU part\t: 0xd4f\n",
}


def cpu(name: str, **environ: str) -> CpuInfo:
    return read_cpu(CPUINFO[name], environ=environ)


@pytest.fixture(autouse=True)
def all_runtimes(monkeypatch):
    """Every runtime a candidate for --precision auto (tests/conftest.py limits the others to eager torch)."""
    monkeypatch.delenv("RRCM_AUTO_RUNTIMES", raising=False)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier("fashion-mnist", 0.25)


def test_cpuinfo_flags_and_features():
    model, flags = parse_cpuinfo(CPUINFO["zen3"])
    assert model == "AMD Ryzen 9 5950X 16-Core Processor" and "avx2" in flags and "avx512f" not in flags
    expected = {  # name: (features, VNNI, native bf16)
        "zen3": (["AVX2"], False, False),
        "skylake": (["AVX2", "AVX-512"], False, False),
        "cooper": (["AVX2", "AVX-512", "AVX512-VNNI", "AVX512-BF16"], True, True),
        "sapphire": (["AVX2", "AVX-512", "AVX-VNNI", "AVX512-VNNI", "AVX512-BF16", "AMX-INT8", "AMX-BF16"], True, True),
        "alderlake": (["AVX2", "AVX-VNNI"], True, False),
        "arm": ([], False, False),
    }
    for name, (features, vnni, bf16) in expected.items():
        info = cpu(name)
        assert (info.features, info.vnni, info.native_bf16) == (features, vnni, bf16), name
    assert "asimd" in cpu("arm").flags and cpu("arm").model  # no model name line: the platform's name
    assert "flags not read" in read_cpu("", environ={}).describe()


def test_onednn_limit_hides_what_oneDNN_may_not_use():
    assert cpu("sapphire", ONEDNN_MAX_CPU_ISA="AVX2").features == ["AVX2"]
    assert cpu("sapphire", ONEDNN_MAX_CPU_ISA="avx512_core_vnni").features == ["AVX2", "AVX-512", "AVX512-VNNI"]
    assert cpu("sapphire", ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16").native_bf16
    assert cpu("sapphire", DNNL_MAX_CPU_ISA="AVX2_VNNI").features == ["AVX2", "AVX-VNNI"]  # oneDNN's older name
    assert cpu("sapphire", ONEDNN_MAX_CPU_ISA="AVX512_CORE").features == ["AVX2", "AVX-512"]  # excludes AVX2_VNNI
    assert cpu("sapphire", ONEDNN_MAX_CPU_ISA="NOT_AN_ISA").features == cpu("sapphire").features  # ignored, as oneDNN does
    assert not cpu("zen3", ONEDNN_MAX_CPU_ISA="AVX512_CORE_AMX").vnni  # a limit adds nothing


def test_description_for_benchmarks():
    info = cpu("cooper", ONEDNN_MAX_CPU_ISA="AVX2")
    record = json.loads(json.dumps(info.to_dict()))
    assert record["model"] == "Intel(R) Xeon(R) Platinum 8380H" and record["features"] == ["AVX2"]
    assert record["vnni"] is False and record["onednn_max_isa"] == "AVX2"
    assert record["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    line = cpu("cooper").describe()
    assert line.startswith("Intel(R) Xeon(R) Platinum 8380H: AVX2, AVX-512, AVX512-VNNI, AVX512-BF16") and "\n" not in line
    assert cpu_info() is cpu_info()  # read once


def test_int8_activation_bits_follow_vnni():
    # Without VNNI, u8 x s8 kernels sum pairs in a saturating int16: 7-bit activations keep them exact.
    assert [activation_bits(cpu(n)) for n in ("zen3", "skylake", "alderlake", "cooper")] == [7, 7, 8, 8]
    assert activation_bits(cpu("cooper", ONEDNN_MAX_CPU_ISA="AVX2")) == 7


@pytest.mark.slow
def test_an_emulated_avx2_cpu_is_what_the_kernels_see():
    if platform.machine().lower() not in ("x86_64", "amd64") or not cpu_info().has("AVX2"):
        pytest.skip("emulating an AVX2-only CPU needs an x86 CPU with AVX2")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ONEDNN_VERBOSE": "1"}
    code = ("import json, torch; from rrcm.cpu import cpu_info; "
            "torch.nn.functional.conv2d(torch.rand(2, 3, 16, 16), torch.rand(4, 3, 3, 3)); "
            "print(json.dumps(cpu_info().to_dict()))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert (record["torch_capability"], record["features"], record["vnni"], record["native_bf16"]) == ("AVX2", ["AVX2"], False, False)
    assert "isa:Intel AVX2" in done.stdout  # oneDNN's own report of the instruction set it runs


def _fake_cpu(monkeypatch, name: str) -> None:
    monkeypatch.setattr(backends, "cpu_info", lambda: cpu(name))


def test_bf16_without_native_support_warns_with_its_measured_cost(classifier, monkeypatch):
    _fake_cpu(monkeypatch, "zen3")
    monkeypatch.setattr(backends, "best_rates", lambda candidates, seconds, rounds=3: {"fp32": 8000.0, "bf16": 1000.0})
    with pytest.warns(PerformanceWarning, match=r"bf16 runs 8\.0x slower than fp32 here \(AMD Ryzen .* emulated; "
                                                r"measured 1,000 vs 8,000 samples/s\)"):
        TorchBackend(classifier, dtype=torch.bfloat16)
    monkeypatch.setattr(backends, "best_rates", lambda candidates, seconds, rounds=3: {"fp32": 8000.0, "bf16": 7000.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not slower by more than BF16_SLOWER: no warning
        TorchBackend(classifier, dtype=torch.bfloat16)
    with pytest.warns(PerformanceWarning, match="emulated and may run several times slower"):
        TorchBackend(torch.nn.Flatten(), dtype=torch.bfloat16)  # no input shape to time it on


def test_bf16_cost_is_measured_only_without_native_bf16(classifier, monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("timed on a CPU with native bf16")

    _fake_cpu(monkeypatch, "cooper")
    monkeypatch.setattr(backends, "best_rates", no_timing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TorchBackend(classifier, dtype=torch.bfloat16)
        TorchBackend(classifier)  # fp32: nothing to time
    # Without native bf16 the real timing runs (its outcome depends on this machine: only its form is checked).
    monkeypatch.undo()
    _fake_cpu(monkeypatch, "zen3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = TorchBackend(classifier, dtype=torch.bfloat16)
    assert all(issubclass(w.category, PerformanceWarning) and "slower than fp32" in str(w.message) for w in caught)
    u = torch.rand(3, 1, 28, 28, dtype=torch.bfloat16)
    assert backend.forward(u).shape == (3, 10)


class FakeRates:
    """timed_rounds with the same fixed results in every round, counting its calls (no timing)."""

    def __init__(self, rates: dict[str, float]):
        self.rates, self.calls = rates, 0

    def __call__(self, candidates, seconds, rounds=3):
        self.calls += 1
        return [{name: self.rates[name] for name in candidates} for _ in range(rounds)]


@pytest.fixture
def eager_only(monkeypatch):
    """Every runtime built as eager torch (no compilation, no export): the probe's bookkeeping alone."""
    monkeypatch.setattr(autoselect, "build_runtime", lambda model, runtime, device: TorchBackend(model, device))


def test_probe_then_cache_without_timing(classifier, tmp_path, monkeypatch, eager_only, capsys):
    cache, cpu_device = tmp_path / "runtimes.json", torch.device("cpu")
    rates = FakeRates({"eager": 100.0, "compiled": 300.0, "onnxruntime": 200.0})
    monkeypatch.setattr(autoselect, "timed_rounds", rates)
    backend, choice = autoselect.select_runtime(classifier, "f" * 64, 32, cpu_device, cache=cache)
    assert (choice.runtime, choice.source, choice.backend, choice.compile, rates.calls) == ("compiled", "probe", "torch", True, 1)
    assert "timing torch eager, torch.compile, ONNX Runtime" in capsys.readouterr().out
    line = choice.summary(32)
    assert line.startswith("runtime: torch.compile, 300 samples/s (fp32, batch 32") and "torch eager 100" in line
    entry = next(iter(json.loads(cache.read_text())["entries"].values()))
    assert entry["key"]["model_sha256"] == "f" * 64 and entry["key"]["cpu"] == cpu_info().to_dict()
    assert entry["key"]["batch"] == 32 and entry["runtime"] == "compiled"
    _, again = autoselect.select_runtime(classifier, "f" * 64, 32, cpu_device, cache=cache)
    assert (again.runtime, again.source, again.rates, rates.calls) == ("compiled", "cache", choice.rates, 1)
    assert "cached choice" in again.summary(32) and capsys.readouterr().out == ""
    autoselect.select_runtime(classifier, "f" * 64, 64, cpu_device, cache=cache)  # another batch: another probe
    autoselect.select_runtime(classifier, "e" * 64, 32, cpu_device, cache=cache)  # another model too
    assert rates.calls == 3 and len(json.loads(cache.read_text())["entries"]) == 3


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[]", b'{"version": 1, "entries": []}',
                                     b'{"version": 1, "entries": {"KEY": {"runtime": "tensorrt", "rates": {}}}}',
                                     b'{"version": 1, "entries": {"KEY": {"runtime": "eager", "rates": {"eager": "fast"}}}}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(classifier, tmp_path, monkeypatch, eager_only, content):
    cache = tmp_path / "rrcm" / "runtimes.json"
    cache.parent.mkdir()
    key = autoselect._digest(autoselect.cache_key("f" * 64, 16, torch.device("cpu")))
    cache.write_bytes(content.replace(b"KEY", key.encode()))
    rates = FakeRates({"eager": 300.0, "compiled": 100.0, "onnxruntime": 200.0})
    monkeypatch.setattr(autoselect, "timed_rounds", rates)
    _, choice = autoselect.select_runtime(classifier, "f" * 64, 16, torch.device("cpu"), cache=cache)
    assert (choice.runtime, choice.source, rates.calls) == ("eager", "probe", 1)
    assert json.loads(cache.read_text())["entries"][key]["runtime"] == "eager"


def test_a_runtime_that_cannot_run_is_skipped(classifier, tmp_path, monkeypatch):
    def build(model, runtime, device):
        if runtime == "onnxruntime":
            raise ModuleNotFoundError("No module named 'onnxruntime'")
        return TorchBackend(model, device)

    monkeypatch.setattr(autoselect, "build_runtime", build)
    monkeypatch.setattr(autoselect, "timed_rounds", FakeRates({"eager": 100.0, "compiled": 90.0}))
    _, choice = autoselect.select_runtime(classifier, "f" * 64, 16, torch.device("cpu"), cache=tmp_path / "c.json")
    assert choice.runtime == "eager" and choice.skipped == {"onnxruntime": "No module named 'onnxruntime'"}
    assert "ONNX Runtime skipped: No module named 'onnxruntime'" in choice.summary(16)


def test_auto_runtimes_can_be_limited(classifier, tmp_path, monkeypatch):
    monkeypatch.setattr(autoselect, "timed_rounds", FakeRates({"eager": 100.0, "compiled": 300.0, "onnxruntime": 200.0}))
    monkeypatch.setenv("RRCM_AUTO_RUNTIMES", "eager,onnxruntime")
    cache = tmp_path / "c.json"
    _, choice = autoselect.select_runtime(classifier, "f" * 64, 16, torch.device("cpu"), cache=cache)
    assert choice.runtime == "onnxruntime" and set(choice.rates) == {"eager", "onnxruntime"}
    entry = next(iter(json.loads(cache.read_text())["entries"].values()))
    assert entry["key"]["candidates"] == ["eager", "onnxruntime"]  # a probe of all three is another entry
    monkeypatch.setenv("RRCM_AUTO_RUNTIMES", "eager")
    monkeypatch.setattr(autoselect, "timed_rounds", FakeRates({}))  # a KeyError if it were asked
    backend, choice = autoselect.select_runtime(classifier, "f" * 64, 16, torch.device("cpu"), cache=cache)
    assert (backend.name, backend.compiled, choice.source) == ("torch", False, "only")
    assert "not timed" in choice.summary(16)
    monkeypatch.setenv("RRCM_AUTO_RUNTIMES", "eager,tensorrt")
    with pytest.raises(UserError, match="RRCM_AUTO_RUNTIMES='eager,tensorrt': name runtimes among eager, compiled"):
        autoselect.select_runtime(classifier, "f" * 64, 16, torch.device("cpu"), cache=cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_is_fp32_torch_without_a_probe(classifier, tmp_path):
    backend, choice = autoselect.select_runtime(classifier, "f" * 64, 16, torch.device("cuda"), cache=tmp_path / "c.json")
    assert (backend.name, backend.dtype, choice.source) == ("torch", torch.float32, "cuda")
    assert not (tmp_path / "c.json").exists()


def test_certify_auto_records_the_runtime_it_ran_and_resumes_on_another(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # A real probe, kept short: eager torch against ONNX Runtime (compilation takes half a minute on 2 cores).
    monkeypatch.setenv("RRCM_AUTO_RUNTIMES", "onnxruntime, eager")
    monkeypatch.setattr(autoselect, "PROBE_SECONDS", 0.1)
    out = tmp_path / "auto.tsv"
    args = ["certify", "--model", "fashion-mnist", "--sigma", "0.25", "--n0", "10", "--n", "100", "--skip", "100",
            "--batch", "50", "--out", str(out)]
    assert main([*args, "--max", "1"]) == 0
    printed = capsys.readouterr().out
    cache = tmp_path / "cache" / "rrcm" / "runtimes.json"
    (digest, entry), = json.loads(cache.read_text())["entries"].items()
    chosen = autoselect.RUNTIMES[entry["runtime"]]
    assert f"runtime: {chosen[2]}, " in printed
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert (sidecar["precision"], sidecar["backend"], sidecar["compile"]) == ("fp32", chosen[0], False)
    # The cache now names the other runtime: the resumed run uses it, without a probe, and still resumes.
    other = next(name for name in ("eager", "onnxruntime") if name != entry["runtime"])
    cache.write_text(json.dumps({"version": 1, "entries": {digest: {**entry, "runtime": other}}}))
    assert main([*args, "--max", "2"]) == 0
    printed = capsys.readouterr().out
    assert "timing" not in printed and f"runtime: {autoselect.RUNTIMES[other][2]}, " in printed
    assert json.loads(out.with_name(out.name + ".json").read_text())["backend"] == autoselect.RUNTIMES[other][0]
    assert [line.split("\t")[0] for line in out.read_text().splitlines()[1:]] == ["0", "100"]
    # An explicit fp32 run is the same classifier: it resumes too, on eager torch, and probes nothing.
    assert main([*args, "--max", "3", "--precision", "fp32"]) == 0
    assert "runtime:" not in capsys.readouterr().out and len(out.read_text().splitlines()) == 4
    assert main([*args[:-2], "--precision", "int4", "--out", str(tmp_path / "x.tsv")]) == 2
    assert "choose from auto, fp32" in capsys.readouterr().err


def test_demo_does_not_probe(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(autoselect, "probe", lambda *a, **k: pytest.fail("rrcm demo probed runtimes"))
    assert main(["demo", "--images", "1", "--n", "100", "--n0", "10"]) == 0
    assert "runtime:" not in capsys.readouterr().out and not (tmp_path / "rrcm").exists()
