"""Reliability and security, class by class: archives unpack inside their folder, one writer per output,
outputs checked before work and written atomically, every value validated, resumption reads only what it
wrote, NaN models are refused, image folders with link loops are walked once. Each class on the command
line and in the Python API."""
from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from deploy_helpers import MODEL_DIR, SIGMA, tiny_checkpoint, write_zip
from rrcm import load_classifier
from rrcm.archive import check_zip
from rrcm.checkpoint import CONFIG, TRAIN_STATE, WEIGHTS, load_train_state, save_checkpoint, state_checksum
from rrcm.cli import main
from rrcm.data import load_dataset
from rrcm.engine import Certifier
from rrcm.engine.runner import Job
from rrcm.errors import UserError
from rrcm.export.aoti import AotiBackend
from rrcm.export.runtime import backend_agreement
from rrcm.model import Classifier
from rrcm.outputs import OutputLock, atomic_write, check_writable
from rrcm.presets import ModelConfig, get_preset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--max-train-images", "32", "--batch-size", "16", "--device", "cpu"]
CERTIFY = ["--n0", "5", "--n", "20", "--max", "3", "--batch", "64", "--device", "cpu", "--precision", "fp32"]

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(capsys) -> str:
    """The one line a refused command printed: `rrcm: error: ...`, and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rrcm: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refuses(argv: list[str], capsys, message: str) -> str:
    assert main(argv) == 2, argv
    line = error_line(capsys)
    assert message in line, line
    return line


# --- 1. archives write nothing outside their folder --------------------------------------------------

def test_check_zip_refuses_every_unsafe_entry(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "state.pt")
    assert [e.filename.split("/", 1)[1] for e in check_zip(tmp_path / "state.pt")][0] == "data.pkl"
    unsafe = {
        "parent": ({"a/../../escaped": b"x", "a/b": b"y"}, None, "'..' in the path"),
        "absolute": ({"/tmp/escaped": b"x"}, None, "absolute"),
        "backslash": ({"a\\..\\b": b"x"}, None, "absolute or non-portable"),
        "symlink": ({"a/link": b"/etc/passwd"}, {"a/link": 0o120777}, "link or special file"),
        "device": ({"a/dev": b""}, {"a/dev": 0o020666}, "link or special file"),
    }
    for name, (entries, attrs, problem) in unsafe.items():
        with pytest.raises(UserError, match=problem):
            check_zip(write_zip(tmp_path / f"{name}.zip", entries, attrs))
    bomb = write_zip(tmp_path / "bomb.zip", {"a/zeros": bytes(10_000_000)}, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(UserError, match="compressed more than"):
        check_zip(bomb)
    with pytest.raises(UserError, match="would unpack to"):
        check_zip(write_zip(tmp_path / "big.zip", {"a/b": bytes(5000)}), max_total_bytes=4096)
    duplicate = tmp_path / "duplicate.zip"
    with pytest.warns(UserWarning), zipfile.ZipFile(duplicate, "w") as z:
        z.writestr("a/b", b"1")
        z.writestr("a/b", b"2")
    with pytest.raises(UserError, match="duplicate"):
        check_zip(duplicate)
    # The directory names one file, the local header (what extraction reads) another.
    data = bytearray(write_zip(tmp_path / "header.zip", {"a/bb": b"x"}).read_bytes())
    data[30:34] = b"../b"
    (tmp_path / "header.zip").write_bytes(bytes(data))
    with pytest.raises(UserError, match="local header"):
        check_zip(tmp_path / "header.zip")


def test_unsafe_package_never_reaches_the_loader(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", lambda *a: calls.append(a))
    target = tmp_path / "outside" / "escaped.txt"
    escape = MODEL_DIR + "../" * 8 + str(target).lstrip("/")
    package = write_zip(tmp_path / "evil.pt2", {MODEL_DIR + "x.so": b"\x7fELF", escape: b"pwned"})
    with pytest.raises(UserError, match="unsafe AOTInductor package"):
        AotiBackend(package)
    with pytest.raises(UserError, match="unsafe AOTInductor package"):
        Certifier(str(package), 10, SIGMA)
    layout = write_zip(tmp_path / "nolib.pt2", {MODEL_DIR + "x.cpp": b"int main(){}", MODEL_DIR + "x_compile_flags.json": b"{}"})
    with pytest.raises(UserError, match="compiled model library"):
        AotiBackend(layout)  # a package without a library would be compiled with commands named in it
    assert not calls and not target.exists()


def test_failed_package_load_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read from TMPDIR
    package = write_zip(tmp_path / "junk.pt2", {MODEL_DIR + "x.so": os.urandom(4096), MODEL_DIR + "x.blob": b"weights"})
    with pytest.raises(UserError, match="cannot load AOTInductor package"):
        AotiBackend(package)
    assert os.environ["TMPDIR"] == str(scratch) and not list(scratch.iterdir())
    refuses(["certify", "--model", str(package), "--out", str(tmp_path / "c.tsv"), *CERTIFY], capsys, "cannot load")
    assert not list(scratch.iterdir()) and not (tmp_path / "c.tsv").exists()


def test_training_state_is_checked_as_an_archive(tmp_path):
    write_zip(tmp_path / TRAIN_STATE, {"s/data.pkl": b"x", "s/../../escaped": b"y"})
    with pytest.raises(UserError, match="unsafe training state"):
        load_train_state(tmp_path)


# --- 2. one writer per output --------------------------------------------------------------------------

HOLDER = """
import sys, time
from rrcm.outputs import OutputLock
locks = [OutputLock(p).acquire() for p in sys.argv[1:]]
print("held", flush=True)
time.sleep(600)
"""


def test_second_writer_is_refused_and_a_killed_one_blocks_nothing(tmp_path, capsys):
    tsv, run, onnx = tmp_path / "c.tsv", tmp_path / "run", tmp_path / "m.onnx"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tsv), str(run), str(onnx)], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = f"in use by another rrcm run (process {holder.pid})"
        refuses(["certify", "--model", str(tiny_checkpoint()), "--out", str(tsv), *CERTIFY], capsys, busy)
        refuses(["pretrain", *TINY, "--steps", "1", "--out", str(run)], capsys, busy)
        refuses(["export", "onnx", "--model", str(tiny_checkpoint()), "--out", str(onnx)], capsys, busy)
        assert not tsv.exists() and not run.exists() and not onnx.exists()
        with pytest.raises(UserError, match="in use"):
            OutputLock(tsv).acquire()  # the Python API too
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # The kernel dropped the dead holder's locks; its lock files are taken over and removed at the end.
    assert len(list(tmp_path.glob("*.lock"))) == 3
    assert main(["certify", "--model", str(tiny_checkpoint()), "--out", str(tsv), *CERTIFY]) == 0
    assert main(["pretrain", *TINY, "--steps", "1", "--out", str(run)]) == 0
    assert main(["export", "onnx", "--model", str(tiny_checkpoint()), "--out", str(onnx)]) == 0
    assert len(tsv.read_text().splitlines()) == 4 and (run / TRAIN_STATE).is_file() and onnx.is_file()
    assert not list(tmp_path.glob("*.lock"))


def test_lock_is_exclusive_in_one_process_too(tmp_path):
    first = OutputLock(tmp_path / "out").acquire()
    with pytest.raises(UserError, match="in use"):
        OutputLock(tmp_path / "out").acquire()
    first.release()
    assert not (tmp_path / "out.lock").exists()
    with OutputLock(tmp_path / "out"):
        assert (tmp_path / "out.lock").read_text().strip() == str(os.getpid())


# --- 3. outputs checked before work, written atomically ---------------------------------------------------

def read_only_folder(tmp_path: Path) -> Path:
    """A folder no one may create files in: chmod where that binds (not root), else /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    try:
        check_writable("/sys/rrcm-probe")
    except UserError:
        return Path("/sys")
    pytest.skip("no read-only place here")


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rrcm.train.loop.run_loop", lambda *a, **k: pytest.fail("trained"))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder\n")
    ro = read_only_folder(tmp_path)
    for out, message in [(blocker / "run", "is a file, not a folder"), (blocker, "is a file, not a folder"),
                         (ro / "run", "cannot write")]:
        refuses(["pretrain", *TINY, "--steps", "1", "--out", str(out)], capsys, message)
        assert "starting" not in capsys.readouterr().out
    for out, message in [(blocker / "c.tsv", "is a file, not a folder"), (ro / "c.tsv", "cannot write"),
                         (tmp_path, "is a folder, not a file")]:
        refuses(["certify", "--model", str(tiny_checkpoint()), "--out", str(out), *CERTIFY], capsys, message)
        refuses(["export", "onnx", "--model", str(tiny_checkpoint()), "--out", str(out)], capsys, message)
    assert blocker.read_text() == "not a folder\n"


def test_folder_with_other_files_is_refused_untouched(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("months of work\n")
    before = snapshot(notes)
    refuses(["pretrain", *TINY, "--steps", "1", "--out", str(notes)], capsys, "holds files rrcm did not write (thesis.tex)")
    assert snapshot(notes) == before and not (tmp_path / "notes.lock").exists()


def test_disk_full_while_saving_keeps_the_last_save(tmp_path, capsys, monkeypatch):
    argv = ["pretrain", *TINY, "--steps", "3", "--save-every", "1", "--log-every", "1"]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        saves.append(obj["step"])
        if len(saves) == 2:
            f.write(b"half a state")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        refuses([*argv, "--out", str(run)], capsys, f"cannot write {run / TRAIN_STATE}: No space left on device")
    assert load_train_state(run)["step"] == 1
    assert sorted(p.name for p in run.iterdir()) == sorted([CONFIG, WEIGHTS, TRAIN_STATE, "log.jsonl"])
    assert main([*argv, "--out", str(run)]) == 0  # resumes from step 1 to what an uninterrupted run gives
    assert torch.equal(load_train_state(run)["model"]["pos_embed"], load_train_state(tmp_path / "straight")["model"]["pos_embed"])


def test_disk_full_while_certifying_keeps_the_rows_written(tmp_path, capsys, monkeypatch):
    from rrcm.engine import runner

    straight, out = tmp_path / "straight.tsv", tmp_path / "c.tsv"
    argv = ["certify", "--model", str(tiny_checkpoint()), *CERTIFY, "--batch", "10"]
    assert main([*argv, "--out", str(straight)]) == 0

    class FullAfterOneRow:
        def __init__(self, path, mode):
            self.f, self.rows = open(path, mode), 0

        def write(self, text):
            self.rows += 1
            if self.rows == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    with monkeypatch.context() as m:
        m.setattr(runner, "open", FullAfterOneRow, raising=False)
        refuses([*argv, "--out", str(out)], capsys, f"cannot write {out}: No space left on device")
    assert len(out.read_text().splitlines()) == 2  # the header and the first row
    assert main([*argv, "--out", str(out)]) == 0
    drop_time = lambda p: [line.rsplit("\t", 1)[0] for line in p.read_text().splitlines()]  # noqa: E731
    assert drop_time(out) == drop_time(straight)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the old model")

    def fails(f):
        f.write(b"half of the new")
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(UserError, match="cannot write .*model.onnx: Read-only file system"):
        atomic_write(path, fails)
    assert path.read_bytes() == b"the old model" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


# --- 4. one validation of every value ------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"num_heads": 0}, "num_heads must be in [1,"), ({"patch_size": 0}, "patch_size must be in [1,"),
    ({"embed_dim": -8}, "embed_dim must be in [1,"), ({"embed_dim": "32"}, "embed_dim must be an integer"),
    ({"depth": 2.0}, "depth must be an integer"), ({"depth": True}, "depth must be an integer"),
    ({"patch_size": 8}, "not a multiple of patch_size"), ({"patch_size": 56}, "not a multiple of patch_size"),
    ({"num_heads": 3}, "divisible by num_heads"), ({"mlp_ratio": float("nan")}, "mlp_ratio"),
    ({"mlp_ratio": -1}, "mlp_ratio"), ({"final_norm": "yes"}, "final_norm"), ({"grid_points": 1}, "grid_points"),
    ({"embed_dim": 16384, "depth": 1024, "num_heads": 16}, "parameters, more than"), ({"image_size": 10**9}, "image_size"),
])
def test_model_sizes_from_config_json_and_the_command_line(change, message, tmp_path, capsys):
    folder = save_checkpoint(tmp_path / "model", Classifier(get_preset("tiny")), get_preset("tiny"), kind="classifier",
                             sigma=SIGMA, dataset="fashion-mnist")
    config = json.loads((folder / CONFIG).read_text())
    config["model"].update(change)
    (folder / CONFIG).write_text(json.dumps(config))
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_classifier(folder)
    refuses(["certify", "--model", str(folder), "--out", str(tmp_path / "c.tsv"), *CERTIFY], capsys, message)
    flags = {"num_heads": "--heads", "patch_size": "--patch-size", "embed_dim": "--embed-dim", "depth": "--depth"}
    if set(change) <= set(flags) and all(isinstance(v, int) and not isinstance(v, bool) for v in change.values()):
        options = [x for k, v in change.items() for x in (flags[k], str(v))]
        refuses(["pretrain", *TINY, *options, "--steps", "1", "--out", str(tmp_path / "run")], capsys, message)
    with pytest.raises(UserError, match="JSON object"):
        ModelConfig.from_dict([1, 2])


def test_counts_and_seeds_are_refused_with_their_limit(tmp_path, capsys):
    model = ["certify", "--model", str(tiny_checkpoint()), "--out", str(tmp_path / "c.tsv"), "--device", "cpu"]
    for option, value, message in [("--n", 10**30, "--n must be in [1, 1,000,000,000,000,000]"),
                                   ("--n0", 2**64, "--n0 must be in [1,"), ("--seed", 2**64, "--seed must be in [0,"),
                                   ("--seed", -1, "--seed must be in [0,"), ("--skip", 0, "--skip must be >= 1"),
                                   ("--batch", -5, "--batch must be >= 1"), ("--batch", 10**15, "GiB of memory")]:
        refuses([*model, option, str(value)], capsys, message)
    assert not (tmp_path / "c.tsv").exists()
    for kwargs, message in [({"n": "100"}, "--n must be an integer"), ({"n": 10.0}, "--n must be an integer"),
                            ({"n": 100, "alpha": "0.1"}, "--alpha must be a finite number"),
                            ({"n": 100, "seed": True}, "--seed must be an integer"),
                            ({"n": 100, "max_images": 0}, "--max must be >= 1")]:
        with pytest.raises(UserError, match=message):
            Job("certify", **{"alpha": 0.001, **kwargs}).check()
    assert len(Job("certify", 100, 0.001, skip=10**30, max_images=10**30).check().indices(10_000)) == 1
    run = str(tmp_path / "run")
    refuses(["pretrain", *TINY, "--batch-size", str(10**12), "--out", run], capsys, "GiB of memory")
    refuses(["pretrain", *TINY, "--seed", str(2**63), "--out", run], capsys, "--seed must be in [0, 9,223,372,036,854,775,807]")
    refuses(["pretrain", *TINY, "--steps", str(10**30), "--out", run], capsys, "--steps must be at most")
    refuses(["finetune", "--from-scratch", *TINY, "--sigma", "0.5", "--epochs", "1e300", "--out", run], capsys,
            "--epochs must be at most")
    refuses(["export", "onnx", "--model", str(tiny_checkpoint()), "--static-batch", str(10**12),
             "--out", str(tmp_path / "m.onnx")], capsys, "GiB of memory")
    refuses(["certify", "--n", "ten"], capsys, "argument --n: invalid int value: 'ten'")  # argparse: one line too


# --- 5. resumption reads what it wrote, and nothing else ---------------------------------------------------

@pytest.fixture()
def finished(tmp_path) -> tuple[Path, list[str]]:
    out = tmp_path / "c.tsv"
    argv = ["certify", "--model", str(tiny_checkpoint()), "--out", str(out), *CERTIFY]
    assert main(argv) == 0
    return out, argv


@pytest.mark.parametrize("damage, message", [
    (lambda rows: rows[:2] + [rows[2][:5] + b"\xff\xfe" + rows[2][5:]] + rows[3:], "line 3 is not UTF-8 text"),
    (lambda rows: rows + [b"7\tx\t1\t0.5\t1\t0:00:01"], "line 5 is not a certify row"),
    (lambda rows: rows + [b"\xc2\xb2\t1\t1\t0.5000\t1\t0:00:01"], "line 5 is not a certify row"),  # a Unicode digit
    (lambda rows: rows + [b"9\t1\t1\t0.5000\t1"], "line 5 is not a certify row"),
    (lambda rows: [b"idx\tlabel"] + rows[1:], "header differs"),
])
def test_resume_refuses_a_damaged_tsv_untouched(finished, damage, message, capsys):
    out, argv = finished
    out.write_bytes(b"\n".join(damage(out.read_bytes().split(b"\n")[:-1])) + b"\n")
    before = out.read_bytes()
    line = refuses(argv, capsys, message)
    assert str(out) in line and out.read_bytes() == before


def test_resume_refuses_a_damaged_part_file(finished, capsys):
    out, argv = finished
    part = out.with_name(out.name + ".part1")
    part.write_bytes(b"5\t1\t1\t0.5000\t1\t0:00:01\n\xff\n")
    refuses(argv, capsys, f"{part}: line 2 is not UTF-8 text")
    assert part.is_file()


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte of the first tensor's data inside a torch.save archive (the zip itself stays valid)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 16)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_length + extra_length + 5] ^= 0x40  # in the data, after the (padded) header
    path.write_bytes(bytes(data))


def test_training_state_with_flipped_bytes_or_another_structure(tmp_path, capsys, monkeypatch):
    from rrcm.train.pretrain import Pretrainer

    run = tmp_path / "run"
    argv = ["pretrain", *TINY, "--steps", "3", "--save-every", "1", "--log-every", "1", "--out", str(run)]
    step_loss = Pretrainer.step_loss

    def killed_at_step_2(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return step_loss(self, step)

    with monkeypatch.context() as m:
        m.setattr(Pretrainer, "step_loss", killed_at_step_2)
        assert main(argv) == 130
    good = (run / TRAIN_STATE).read_bytes()
    with open(run / "log.jsonl", "a") as f:  # a line a resume drops: it must stay while the state is refused
        f.write('{"step": 99, "loss": 1.0}\n')
    for variant, message in [("flipped", "fails its checksum"), ("no checksum", "no checksum"),
                             ("structure", "unexpected structure"), ("wrong model", "its model does not fit this run")]:
        (run / TRAIN_STATE).write_bytes(good)
        if variant == "flipped":
            flip_tensor_byte(run / TRAIN_STATE)
        else:
            state = torch.load(run / TRAIN_STATE, weights_only=True)
            if variant == "no checksum":
                del state["sha256"]
            else:
                state.update(step="two") if variant == "structure" else state.update(model={"pos_embed": torch.zeros(3)})
                state["sha256"] = state_checksum(state)
            torch.save(state, run / TRAIN_STATE)
        damaged, log = (run / TRAIN_STATE).read_bytes(), (run / "log.jsonl").read_bytes()
        assert str(run / TRAIN_STATE) in refuses(argv, capsys, message) or variant == "wrong model"
        assert (run / TRAIN_STATE).read_bytes() == damaged and (run / "log.jsonl").read_bytes() == log
    (run / TRAIN_STATE).write_bytes(good)
    assert main(argv) == 0  # the state it wrote resumes, and the log loses the lines after its step
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


# --- 6. a model that answers NaN or Inf is refused, never certified ----------------------------------------

class NaNOnSomeInputs(torch.nn.Module):
    """Finite logits for most noisy images, NaN where the first pixel is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 10)
        logits[x[:, 0, 0, 0] > 0.9] = float("nan")
        return logits


@pytest.mark.parametrize("sampler", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton"))])
def test_nan_or_inf_logits_during_sampling_are_refused(sampler):
    x = torch.full((1, 28, 28), 0.5)
    certifier = Certifier(NaNOnSomeInputs(), 10, SIGMA, batch_size=64, sampler=sampler)
    for call in (lambda: certifier.certify(x, 10, 200, 0.01, seed=0), lambda: certifier.predict(x, 200, 0.01, seed=0),
                 lambda: certifier.certify(x, 10, 200, 0.01, seed=0, adaptive=True),
                 lambda: certifier.certify_radius(x, 0.1, 0.01, seed=0, max_samples=500),
                 lambda: certifier.certify_many(x[None].repeat(3, 1, 1, 1), 10, 200, 0.01, [1, 2, 3])):
        with pytest.raises(UserError, match="NaN or Inf logits"):
            call()
    if sampler == "triton":  # padded fixed-size batches: the padding rows are not the model's answers
        certifier.sampler.static_batches = True
        with pytest.raises(UserError, match="NaN or Inf logits"):
            certifier.certify(x, 10, 100, 0.01, seed=0)
        finite = Certifier(torch.nn.Flatten(), 784, SIGMA, batch_size=64, sampler=sampler)
        finite.sampler.static_batches = True
        assert finite.certify(x, 10, 100, 0.01, seed=0).counts.sum() == 100


def test_nan_or_inf_models_are_refused(tmp_path, capsys):
    cfg = get_preset("tiny")
    model = Classifier(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    nan_weights = save_checkpoint(tmp_path / "nan", model, cfg, kind="classifier", sigma=SIGMA, dataset="fashion-mnist")
    with torch.no_grad():
        model.linear_head.weight.fill_(3e38)
        model.linear_head.bias.fill_(0.0)
        for p in model.base_model.parameters():
            p.fill_(1.0)
    inf_logits = save_checkpoint(tmp_path / "inf", model, cfg, kind="classifier", sigma=SIGMA, dataset="fashion-mnist")
    for folder, message in [(nan_weights, "holds NaN or Inf values"), (inf_logits, "NaN or Inf logits")]:
        refuses(["certify", "--model", str(folder), "--out", str(tmp_path / "c.tsv"), *CERTIFY], capsys, message)
        refuses(["export", "onnx", "--model", str(folder), "--out", str(tmp_path / "m.onnx")], capsys, message)
    assert not (tmp_path / "c.tsv").exists() and not (tmp_path / "m.onnx").exists()
    nan_classifier = load_classifier(tiny_checkpoint())
    nan_classifier.classifier.linear_head.bias.data.fill_(float("inf"))
    with pytest.raises(UserError, match="NaN or Inf logits"):
        backend_agreement(nan_classifier, Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA).backend)


# --- 7. data readers terminate ---------------------------------------------------------------------------------

def test_image_folders_with_link_loops_list_each_file_once(tmp_path):
    for split in ("train", "val"):
        cls = tmp_path / split / "cat"
        (cls / "deep").mkdir(parents=True)
        Image.new("RGB", (12, 12), (200, 10, 10)).save(cls / "a.png")
        Image.new("RGB", (12, 12), (10, 200, 10)).save(cls / "deep" / "b.png")
        (cls / "deep" / "loop").symlink_to(cls, target_is_directory=True)  # cat/deep/loop/deep/loop/...
        (cls / "alias.png").symlink_to(cls / "a.png")
    data = load_dataset("imagenet", "train", str(tmp_path), image_size=8)
    assert len(data) == 2 and data.classes == ["cat"]
    assert sorted(Path(f).name for f in data.files) == ["a.png", "b.png"]
    assert math.isclose(float(data[0][0][0].mean()), 200 / 255, rel_tol=1e-3)
