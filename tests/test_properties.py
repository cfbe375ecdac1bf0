"""The command line's contract, checked on generated input: `rrcm certify`, `predict`, `pretrain` and
`export onnx` with generated option values (zero, negative, huge, NaN, Inf, not numbers) and generated
files (random bytes, truncated models, damaged configs, data and earlier outputs) either succeed (exit 0)
or print a single `rrcm: error: ...` line and exit 2, never a traceback, and files written before the call
stay as they were.

The generated values are chosen so that every valid combination is cheap (the tiny preset, a few samples
and steps); derandomized, so CI runs the same cases every time.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("hypothesis", reason="the `test` extra: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deploy_helpers import SIGMA, tiny_checkpoint
from rrcm.checkpoint import CONFIG, WEIGHTS
from rrcm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
FMNIST = "/usr/share/datasets/fashion-mnist"
CASES = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """Files made before the calls: models good and bad, data folders, finished outputs."""
    root = tmp_path_factory.mktemp("workspace")
    tiny = Path(shutil.copytree(tiny_checkpoint(), root / "tiny"))
    onnx = root / "tiny.onnx"
    assert main(["export", "onnx", "--model", str(tiny), "--out", str(onnx)]) == 0
    finished = root / "finished.tsv"
    assert main(["certify", "--model", str(tiny), "--n0", "5", "--n", "10", "--max", "2", "--batch", "16",
                 "--device", "cpu", "--precision", "fp32", "--out", str(finished)]) == 0
    run = root / "run"
    assert main(["pretrain", "--preset", "tiny", "--steps", "1", "--batch-size", "8", "--max-train-images", "16",
                 "--device", "cpu", "--out", str(run)]) == 0
    blocker = root / "a-file"
    blocker.write_text("in the way\n")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    return {"root": root, "tiny": tiny, "onnx": onnx, "finished": finished, "run": run, "blocker": blocker,
            "foreign": foreign}


def snapshot(ws: dict[str, Path], folder: Path) -> dict[str, bytes]:
    """The workspace's files (but for earlier examples' folders) and this example's."""
    files = [p for p in ws["root"].rglob("*") if "calls" not in p.parts] + list(folder.rglob("*"))
    return {str(p): p.read_bytes() for p in files if p.is_file()}


def call(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def check_contract(ws: dict[str, Path], folder: Path, argv: list[str], outputs: list[Path]) -> None:
    """Run argv; exit 0, or exit 2 with one `rrcm: error:` line; earlier files unchanged (but for the outputs
    of a call that succeeded)."""
    before = snapshot(ws, folder)
    code, err = call(argv)
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("rrcm: error: ")]
        assert len(errors) == 1, (argv, err)
    after = snapshot(ws, folder)
    mine = {str(p) for p in outputs} if code == 0 else set()
    changed = [p for p, data in before.items() if after.get(p) != data and not any(p.startswith(m) for m in mine)]
    assert not changed, (argv, code, err, changed)


def fresh(ws: dict[str, Path]) -> Path:
    (ws["root"] / "calls").mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(dir=ws["root"] / "calls"))


@st.composite
def model_path(draw, ws: dict[str, Path], folder: Path, faulty: bool) -> str:
    """A model argument: the tiny checkpoint or the bundled one; faulty: missing, random bytes, a truncated
    export, or a checkpoint with a damaged config or weights file."""
    if not faulty:
        return draw(st.sampled_from([str(ws["tiny"]), str(ws["tiny"]), "fashion-mnist"]))
    kind = draw(st.sampled_from(["missing", "junk", "truncated onnx", "bad config", "bad config", "bad weights"]))
    if kind == "missing":
        return str(folder / "nowhere")
    if kind == "junk":
        path = folder / f"junk{draw(st.sampled_from(['.onnx', '.pt2', '.plan', '.bin', '']))}"
        path.write_bytes(draw(st.binary(max_size=512)))
        return str(path)
    if kind == "truncated onnx":
        data = ws["onnx"].read_bytes()
        path = folder / "cut.onnx"
        path.write_bytes(data[:draw(st.integers(0, len(data) - 1))])
        return str(path)
    damaged = Path(shutil.copytree(ws["tiny"], folder / "damaged"))
    if kind == "bad config":
        config = json.loads((damaged / CONFIG).read_text())
        key = draw(st.sampled_from(sorted(config["model"]) + ["format", "model", "sigma", "kind"]))
        value = draw(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                               st.text(max_size=5), st.lists(st.integers(), max_size=2)))
        (config["model"] if key in config["model"] else config)[key] = value
        (damaged / CONFIG).write_text(json.dumps(config))
    else:
        weights = (damaged / WEIGHTS).read_bytes()
        cut = draw(st.integers(0, len(weights) - 1))
        (damaged / WEIGHTS).write_bytes(weights[:cut] + draw(st.binary(max_size=64)))
    return str(damaged)


@st.composite
def data_dir(draw, folder: Path, faulty: bool) -> list[str]:
    """--data-dir: the standard folder (named or not); faulty: random or truncated IDX files, or no folder."""
    if not faulty:
        return draw(st.sampled_from([[], ["--data-dir", FMNIST]]))
    kind = draw(st.sampled_from(["junk", "truncated", "missing"]))
    if kind == "missing":
        return ["--data-dir", str(folder / "no-data")]
    data = folder / "data"
    data.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        if kind == "junk":
            content = draw(st.binary(max_size=256))
        else:
            with open(Path(FMNIST) / f"{name}.gz", "rb") as f:
                content = f.read(draw(st.integers(0, 4096)))
        (data / name).write_bytes(content)
    return ["--data-dir", str(data)]


@st.composite
def out_path(draw, ws: dict[str, Path], folder: Path, suffix: str, faulty: bool) -> Path:
    """--out: new, or nested in new folders, or an earlier output (the finished TSV to resume; a copy of an
    export to replace); faulty: under a file, a folder where a file goes (a file where a folder goes), a
    folder of someone else's files, a read-only place."""
    if not faulty:
        kind = draw(st.sampled_from(["fresh", "fresh", "nested", "earlier"]))
        if kind == "earlier":
            return {".tsv": ws["finished"], ".onnx": Path(shutil.copy(ws["onnx"], folder / "earlier.onnx")),
                    "": ws["run"]}[suffix]
        return folder / f"out{suffix}" if kind == "fresh" else folder / "new" / "deeper" / f"out{suffix}"
    kind = draw(st.sampled_from(["under a file", "wrong kind", "foreign", "read-only"]))
    if kind == "wrong kind":
        return ws["blocker"] if suffix == "" else folder
    return {"under a file": ws["blocker"] / f"out{suffix}", "foreign": ws["foreign"] / f"out{suffix}" if suffix else
            ws["foreign"], "read-only": Path("/sys") / f"rrcm-out{suffix}"}[kind]


BAD_NUMBERS = ["0", "-1", "nan", "inf", "-inf", "x", ""]
HUGE = [str(10**16), str(2**63), str(2**64), str(10**30)]


class Options:
    """Draws option values: good ones, except for the few options chosen to be `faulty` in this example,
    so that most examples get past the checks and reach the work, and each check still meets bad values."""

    def __init__(self, draw, names: list[str], max_faults: int = 2):
        self.draw = draw
        self.faulty = draw(st.sets(st.sampled_from(names), max_size=draw(st.integers(0, max_faults))))

    def __call__(self, name: str, good: list[str | None], bad: list[str | None]) -> list[str]:
        value = self.draw(st.sampled_from(bad if name in self.faulty else good))
        return [] if value is None else [name, value]


ENGINE = ["model", "out", "data", "--n", "--n0", "--batch", "--alpha", "--seed", "--sigma", "--device", "--precision",
          "--backend", "--dataset", "--sampler", "--max", "--skip", "--radius", "--beta", "--tolerance", "argv"]


@st.composite
def engine_argv(draw, ws: dict[str, Path], mode: str) -> tuple[Path, list[str], Path]:
    folder = fresh(ws)
    o = Options(draw, ENGINE)
    out = draw(out_path(ws, folder, ".tsv", "out" in o.faulty))
    argv = [mode, "--model", draw(model_path(ws, folder, "model" in o.faulty)), "--out", str(out)]
    argv += o("--n", ["10", "10", "1", "30"], [*BAD_NUMBERS, *HUGE])
    argv += o("--batch", [None, "16", "7", "1", "64"], ["0", "-5", str(10**12), str(2**70), "x"])
    argv += o("--alpha", [None, "0.001", "0.5", "1e-300"], ["1", *BAD_NUMBERS])
    argv += o("--seed", [None, "0", "5", str(2**63 - 1)], ["-1", *HUGE, "x"])
    argv += o("--sigma", [None, None, str(SIGMA)], ["0.5", *BAD_NUMBERS])
    argv += o("--device", ["cpu"], ["cuda", "cuda:7", "tpu", ""])
    argv += o("--precision", ["fp32", "fp32", "bf16"], ["fp64", "int4", ""])
    argv += o("--backend", [None, None, "torch"], ["onnxruntime", "aoti", "tensorrt", "foo"])
    argv += o("--dataset", [None, "fashion-mnist"], ["cifar10", "imagenet", "mnist"])
    argv += o("--sampler", [None, "torch"], ["x", ""])
    argv += draw(data_dir(folder, "data" in o.faulty))
    # Every valid combination stays small: at most 2 images (a huge --max only with a huge --skip).
    limit = o("--max", ["1", "2"], ["0", "-3", "x", str(10**30)])
    argv += ["--max", "1"] if not limit else limit
    argv += ["--skip", str(10**30)] if limit[-1:] == [str(10**30)] else o("--skip", [None, "1", "7", str(10**30)],
                                                                           ["0", "-1", "x"])
    if mode == "certify":
        argv += o("--n0", [None, "5"], [*BAD_NUMBERS, *HUGE])
        variant = draw(st.sampled_from(["plain", "plain", "radius", "adaptive"]))
        if variant == "radius":
            argv += ["--radius", draw(st.sampled_from(["0", "0.1"] if "--radius" not in o.faulty else BAD_NUMBERS))]
            argv += o("--beta", [None, "0", "0.5"], ["1", "nan", "-1"])
        elif variant == "adaptive":
            argv += ["--adaptive"] + o("--tolerance", [None, "0.01"], ["0", "nan", "-1"])
    if "argv" in o.faulty:
        argv.append(draw(st.sampled_from(["--bogus", "--n", "--out", "stray"])))
    return folder, argv, out


@given(data=st.data())
@settings(CASES, max_examples=70)
def test_certify_contract(ws, data):
    folder, argv, out = data.draw(engine_argv(ws, "certify"))
    check_contract(ws, folder, argv, [out, out.with_name(out.name + ".json")])


@given(data=st.data())
@settings(CASES, max_examples=30)
def test_predict_contract(ws, data):
    folder, argv, out = data.draw(engine_argv(ws, "predict"))
    check_contract(ws, folder, argv, [out, out.with_name(out.name + ".json")])


PRETRAIN = ["out", "data", "--preset", "--steps", "--batch-size", "--max-train-images", "--embed-dim", "--depth",
            "--heads", "--patch-size", "--lr", "--seed", "--warmup", "--save-every", "--log-every", "--weight-decay",
            "--precision", "--device"]


@given(data=st.data())
@settings(CASES, max_examples=45)
def test_pretrain_contract(ws, data):
    folder = fresh(ws)
    o = Options(data.draw, PRETRAIN)
    out = data.draw(out_path(ws, folder, "", "out" in o.faulty))
    argv = ["pretrain", "--out", str(out)]
    argv += o("--preset", ["tiny"], ["nope", "", "fmnist-b"])  # fmnist-b: refused for its memory only with a huge batch
    argv += o("--steps", ["1", "2"], [*BAD_NUMBERS, *HUGE])  # never the default: thousands of steps
    argv += o("--batch-size", ["8", "16"], ["0", "-4", "33", str(10**12), "x"])
    argv += o("--max-train-images", ["16", "32"], ["0", "-1", "x"]) or ["--max-train-images", "16"]
    argv += o("--embed-dim", [None, "16", "32"], ["0", "-2", "7", "33", str(10**6)])
    argv += o("--depth", [None, "1", "2"], ["0", str(10**5), "x"])
    argv += o("--heads", [None, "1", "4"], ["0", "3", str(10**4)])
    argv += o("--patch-size", [None, "7", "14"], ["0", "5", "100", "x"])
    argv += o("--lr", [None, "1e-3"], BAD_NUMBERS)
    argv += o("--seed", [None, "0", str(2**63 - 1)], ["-1", *HUGE])
    argv += o("--warmup", [None, "0", "5"], ["-1", "x"])
    argv += o("--save-every", [None, "1", "0"], ["-1", "x"])
    argv += o("--log-every", [None, "1"], ["0", "-1", "x"])
    argv += o("--weight-decay", [None, "0.05", "0"], ["nan", "-1", "inf"])
    argv += o("--precision", [None, "fp32", "bf16"], ["fp16", "x"])
    argv += o("--device", ["cpu"], ["cuda", "tpu"])
    argv += data.draw(data_dir(folder, "data" in o.faulty))
    check_contract(ws, folder, argv, [out])


@given(data=st.data())
@settings(CASES, max_examples=25)
def test_export_onnx_contract(ws, data):
    folder = fresh(ws)
    o = Options(data.draw, ["model", "out", "--sigma", "--opset", "--static-batch"], max_faults=1)
    out = data.draw(out_path(ws, folder, ".onnx", "out" in o.faulty))
    argv = ["export", "onnx", "--model", data.draw(model_path(ws, folder, "model" in o.faulty)), "--out", str(out)]
    argv += o("--sigma", [None, str(SIGMA)], ["0.5", *BAD_NUMBERS])
    argv += o("--opset", [None, "17", "18"], ["0", "16", str(10**6), "x"])
    argv += o("--static-batch", [None, "1", "3"], ["0", "-1", str(10**12), "x"])
    check_contract(ws, folder, argv, [out])
