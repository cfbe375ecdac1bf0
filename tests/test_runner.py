"""`rrcm certify` / `rrcm predict`: Cohen et al.'s TSV, sidecar, resume after a kill, sharding, bad input."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy_helpers import SIGMA, fashion_test_images, tiny_checkpoint
from rrcm import load_classifier
from rrcm.cli import main
from rrcm.engine import Certifier
from rrcm.engine.certifier import derive_seed
from rrcm.export.onnx import export_onnx, save_onnx

ROOT = Path(__file__).resolve().parents[1]
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"


pytestmark = pytest.mark.usefixtures("one_thread")


def certify(out: Path, *extra: str, model: str | None = None) -> int:
    return main(["certify", "--model", model or str(tiny_checkpoint()), "--out", str(out), *extra])


def rows(path: Path) -> list[list[str]]:
    """The data rows without the time column."""
    lines = path.read_text().splitlines()
    return [line.split("\t")[:-1] for line in lines[1:]]


def test_tsv_rows_are_the_certifier_results(tmp_path):
    out = tmp_path / "c.tsv"
    assert certify(out, "--n0", "20", "--n", "300", "--alpha", "0.01", "--skip", "5", "--max", "6", "--batch", "400", "--seed", "3") == 0
    lines = out.read_text().splitlines()
    assert lines[0] == HEADER
    certifier = Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA, batch_size=400)
    images, labels = fashion_test_images(26)
    got = [line.split("\t") for line in lines[1:]]
    assert [int(r[0]) for r in got] == [0, 5, 10, 15, 20, 25]
    for idx, label, predict, radius, correct, elapsed in got:
        i = int(idx)
        want = certifier.certify(images[i], 20, 300, 0.01, seed=derive_seed(3, i))
        assert int(label) == labels[i] and int(predict) == want.prediction
        assert float(radius) <= want.radius < float(radius) + 1e-4  # rounded down, never up
        assert int(correct) == int(want.prediction == labels[i])
        assert re.fullmatch(r"\d+:\d\d:\d\d(\.\d+)?", elapsed)
    sidecar = json.loads((tmp_path / "c.tsv.json").read_text())
    assert {k: sidecar[k] for k in ("command", "n0", "n", "alpha", "skip", "max", "seed", "sigma", "dataset")} == {
        "command": "certify", "n0": 20, "n": 300, "alpha": 0.01, "skip": 5, "max": 6, "seed": 3, "sigma": SIGMA,
        "dataset": "fashion-mnist"}
    assert len(sidecar["model_sha256"]) == 64


def test_predict_tsv(tmp_path):
    out = tmp_path / "p.tsv"
    assert main(["predict", "--model", str(tiny_checkpoint()), "--n", "400", "--alpha", "0.01", "--max", "4", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tcorrect\ttime"
    certifier = Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA, batch_size=1000)
    images, labels = fashion_test_images(4)
    for line in lines[1:]:
        idx, label, predict, correct, _ = line.split("\t")
        want = certifier.predict(images[int(idx)], 400, 0.01, seed=derive_seed(0, int(idx)))
        assert int(predict) == want and int(correct) == int(want == labels[int(idx)])


def test_rerun_resumes_and_extends(tmp_path):
    out = tmp_path / "r.tsv"
    args = ("--n0", "10", "--n", "200", "--skip", "3")
    assert certify(out, *args, "--max", "4") == 0
    first = out.read_text()
    assert certify(out, *args, "--max", "4") == 0
    assert out.read_text() == first  # nothing repeated, nothing rewritten
    assert certify(out, *args, "--max", "7", "--batch", "64") == 0  # batch size may change on resume
    assert out.read_text().startswith(first)
    assert [int(r[0]) for r in rows(out)] == [0, 3, 6, 9, 12, 15, 18]
    reference = tmp_path / "ref.tsv"
    assert certify(reference, *args, "--max", "7") == 0
    assert rows(out) == rows(reference)


def test_resume_merges_shards_and_drops_a_torn_line(tmp_path):
    """What a killed torchrun run leaves: part files (one ending in a partial line) and no merged rows."""
    args = ("--n0", "10", "--n", "100", "--max", "8")
    reference = tmp_path / "ref.tsv"
    assert certify(reference, *args) == 0
    out = tmp_path / "s.tsv"
    lines = reference.read_text().splitlines()
    (tmp_path / "s.tsv.json").write_text((tmp_path / "ref.tsv.json").read_text())
    out.write_text(lines[0] + "\n" + lines[1] + "\n")
    (tmp_path / "s.tsv.part0").write_text(lines[3] + "\n" + lines[5] + "\n" + lines[7][:5])
    (tmp_path / "s.tsv.part1").write_text(lines[4] + "\n" + lines[2] + "\n")
    assert certify(out, *args) == 0
    assert rows(out) == rows(reference)
    assert not list(tmp_path.glob("s.tsv.part*"))


# `rrcm certify` that kills itself (SIGKILL, nothing cleaned up) as it starts the fifth image: after four rows,
# whatever the machine's speed.
KILLED_AT_THE_FIFTH_IMAGE = """
import os, signal, sys
from rrcm.cli import main
from rrcm.engine import runner
outcomes, calls = runner._outcomes, []
def outcomes_until_the_fifth(*args):
    calls.append(args)
    if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return outcomes(*args)
runner._outcomes = outcomes_until_the_fifth
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes(tmp_path):
    # n0 + n above --batch: one image per call of the certifier, one row each
    args = ["--model", str(tiny_checkpoint()), "--n0", "50", "--n", "500", "--batch", "500", "--max", "30", "--seed", "1"]
    out = tmp_path / "k.tsv"
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THE_FIFTH_IMAGE, "certify", *args, "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = rows(out)
    assert [int(r[0]) for r in done] == [0, 1, 2, 3]
    with open(out, "a") as f:  # a row torn by the kill
        f.write(f"{len(done)}\t7\t")
    assert main(["certify", *args, "--out", str(out)]) == 0
    reference = tmp_path / "ref.tsv"
    assert main(["certify", *args, "--out", str(reference)]) == 0
    assert rows(out)[:len(done)] == done
    assert rows(out) == rows(reference)
    assert [int(r[0]) for r in rows(out)] == list(range(30))


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    args = ["--model", str(tiny_checkpoint()), "--n0", "20", "--n", "400", "--skip", "7", "--max", "9", "--seed", "5"]
    single = tmp_path / "single.tsv"
    assert main(["certify", *args, "--out", str(single)]) == 0
    sharded = tmp_path / "sharded.tsv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # '--' keeps torchrun from reading --n and --max as abbreviations of its own options.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "rrcm", "--", "certify", *args, "--out", str(sharded)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sharded.read_text().splitlines()[0] == HEADER
    assert rows(sharded) == rows(single)
    assert [int(r[0]) for r in rows(sharded)] == list(range(0, 63, 7))
    assert not list(tmp_path.glob("sharded.tsv.part*"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run whose file every bad command below must leave untouched."""
    folder = tmp_path_factory.mktemp("finished")
    out = folder / "done.tsv"
    assert certify(out, "--n0", "10", "--n", "100", "--max", "3") == 0
    return out


def _other_models(folder: Path) -> dict[str, str]:
    from rrcm.checkpoint import save_checkpoint
    from rrcm.model import Classifier
    from rrcm.presets import get_preset

    seven = get_preset("tiny", num_classes=7)
    rgb = get_preset("tiny", image_size=32, patch_size=8, in_chans=3, dataset="cifar10")
    save_onnx(export_onnx(load_classifier(save_checkpoint(folder / "rgb", Classifier(rgb), rgb, kind="classifier",
                                                          sigma=SIGMA, dataset="cifar10"))), folder / "rgb.onnx")
    save_checkpoint(folder / "seven", Classifier(seven), seven, kind="classifier", sigma=SIGMA, dataset="fashion-mnist")
    (folder / "junk.onnx").write_bytes(os.urandom(2048))
    (folder / "empty").mkdir()
    return {name: str(folder / name) for name in ("rgb.onnx", "seven", "junk.onnx", "empty", "missing")}


def test_bad_input_exit_2_one_line_rows_intact(finished, tmp_path, capsys):
    models = _other_models(tmp_path)
    before = finished.read_text()
    ok = ["--n0", "10", "--n", "100", "--max", "3"]
    cases = [
        (["--n0", "0", "--n", "100"], "n0"), (["--n0", "10", "--n", "0"], "n"), (["--alpha", "0"], "alpha"),
        (["--alpha", "1.5"], "alpha"), (["--batch", "0"], "batch"), (["--skip", "0"], "skip"), (["--max", "0"], "max"),
        (["--backend", "tensorflow"], "unknown backend"), (["--dataset", "mnist"], "unknown dataset"),
        (["--data-dir", str(tmp_path / "nowhere")], "does not exist"), (["--precision", "fp7"], "unknown precision"),
        (["--n", "200"], "n=100"), (["--seed", "4"], "seed=0"), (["--alpha", "0.01"], "alpha=0.001"),
        (["--sigma", "0.5"], "sigma 0.25"),
        (["--model", models["seven"]], "7 classes"), (["--model", models["junk.onnx"]], "not a usable ONNX model"),
        (["--model", models["empty"]], "not a checkpoint folder"), (["--model", models["missing"]], "no such"),
        (["--model", models["rgb.onnx"], "--dataset", "fashion-mnist"], "(3, 32, 32)"),
        (["--model", models["rgb.onnx"], "--sigma", "-1", "--dataset", "fashion-mnist"], "sigma"),
        (["--model", models["rgb.onnx"], "--compile"], "torch backend only"),
    ]
    for extra, message in cases:
        args = ["certify", "--model", str(tiny_checkpoint()), "--out", str(finished), *ok, *extra]
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("rrcm: error: ") and err.count("\n") == 1, (extra, err)
        assert message in err, (extra, err)
        assert finished.read_text() == before
    orphan = tmp_path / "orphan.tsv"
    orphan.write_text("my notes\n")
    assert certify(orphan, *ok) == 2
    assert "without its sidecar" in capsys.readouterr().err and orphan.read_text() == "my notes\n"


def test_bad_input_through_the_console_has_no_traceback(finished):
    done = subprocess.run([sys.executable, "-m", "rrcm", "certify", "--model", str(tiny_checkpoint()), "--out", str(finished),
                           "--n0", "10", "--n", "100", "--max", "3", "--alpha", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr == "rrcm: error: --alpha must be in (0, 1), got 2.0\n"


def test_onnx_model_gives_the_same_rows(tmp_path):
    path = tmp_path / "tiny.onnx"
    save_onnx(export_onnx(load_classifier(tiny_checkpoint())), path)
    args = ("--n0", "20", "--n", "500", "--max", "4", "--batch", "300")
    assert certify(tmp_path / "torch.tsv", *args) == 0
    assert certify(tmp_path / "onnx.tsv", *args, model=str(path)) == 0  # sigma and dataset from the metadata
    assert certify(tmp_path / "exported.tsv", *args, "--backend", "onnxruntime") == 0  # checkpoint exported on the fly
    assert rows(tmp_path / "onnx.tsv") == rows(tmp_path / "torch.tsv") == rows(tmp_path / "exported.tsv")
    assert json.loads((tmp_path / "onnx.tsv.json").read_text())["backend"] == "onnxruntime"
    assert np.isfinite(float(rows(tmp_path / "onnx.tsv")[0][3]))
