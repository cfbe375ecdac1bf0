"""The last bad inputs, by class: run folders holding files under rrcm's names that rrcm did not write, training
counts beyond any run, public checkpoints loaded on assumed conventions; and `rrcm info` without a preset."""
from __future__ import annotations

import json
import warnings

import pytest

from rrcm.checkpoint import ConventionWarning, load_public_checkpoint
from rrcm.cli import main
from rrcm.model import Classifier, parameter_counts
from rrcm.presets import PRESETS, get_preset
from rrcm.train.loop import LOG, MAX_STEPS

TINY = ["--preset", "tiny", "--max-train-images", "32", "--batch-size", "16", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rrcm: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def contents(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("name, data, message", [
    ("model.safetensors", b"someone's weights", "holds a model.safetensors without the config.json and train_state.pt"),
    (LOG, b"my notes\n", "holds a log.jsonl that rrcm did not write"),
    (LOG, b"my notes", "holds a log.jsonl that rrcm did not write"),  # one line, no newline: not the start of a record
    (LOG, b'{"step": 20, "loss": 1.0}\n[1, 2]\n', "holds a log.jsonl that rrcm did not write"),
    (LOG, b'{"loss": 1.0, "step": 20}\n', "holds a log.jsonl that rrcm did not write"),
])
def test_a_fresh_run_refuses_files_under_its_names_that_it_did_not_write(tmp_path, capsys, name, data, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(data)
    before = contents(out)
    line = refused(["pretrain", *TINY, "--steps", "1", "--out", str(out)], capsys)
    assert message in line and "choose a new or empty folder" in line
    assert contents(out) == before and not (tmp_path / "run.lock").exists()


def test_the_log_of_a_run_killed_before_its_first_save_is_taken_over(tmp_path, capsys):
    """What a run killed between its first log line and its first save leaves: its records and a cut line."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOG).write_bytes(b'{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "lo')
    assert main(["pretrain", *TINY, "--steps", "2", "--log-every", "1", "--out", str(out)]) == 0
    steps = [json.loads(line)["step"] for line in (out / LOG).read_text().splitlines()]
    assert steps == [1, 2] and 9.0 not in [json.loads(line)["loss"] for line in (out / LOG).read_text().splitlines()]
    capsys.readouterr()


@pytest.mark.parametrize("option, value, message", [
    ("--warmup", MAX_STEPS + 1, "--warmup must be in [0, 10,000,000,000]"), ("--warmup", -1, "--warmup must be in [0,"),
    ("--save-every", 10**20, "--save-every must be in [0, 10,000,000,000]"), ("--save-every", -1, "--save-every must be in"),
    ("--log-every", 0, "--log-every must be in [1, 10,000,000,000]"), ("--log-every", 10**20, "--log-every must be in [1,"),
])
def test_training_counts_beyond_any_run_are_refused(tmp_path, capsys, option, value, message):
    line = refused(["pretrain", *TINY, "--steps", "1", option, str(value), "--out", str(tmp_path / "run")], capsys)
    assert message in line and not (tmp_path / "run").exists()


def test_a_public_checkpoint_names_the_conventions_it_assumed():
    cfg = get_preset("tiny")
    state = {f"module.{k}": v for k, v in Classifier(cfg).state_dict().items()}
    with pytest.warns(ConventionWarning, match=r"assumed final_norm=True \(the fine-tuning's layernorm option\) and the "
                                               r"81-point time grid \(pretrain_step: .*\), the defaults of tiny; .*several "
                                               r"units with no error"):
        load_public_checkpoint(state, "tiny")
    with pytest.warns(ConventionWarning, match=r"assumed the 81-point time grid .* of this ModelConfig") as caught:
        load_public_checkpoint(state, cfg, final_norm=True)
    assert "final_norm=" not in str(caught[0].message)
    with pytest.warns(ConventionWarning, match=r"assumed final_norm=True .*, the defaults of tiny;") as caught:
        load_public_checkpoint(state, "tiny", pretrain_step=300_000)
    assert "time grid" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_public_checkpoint(state, "tiny", final_norm=True, pretrain_step=300_000)


def test_info_without_a_preset_lists_them_all(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["preset", "dataset", "px", "patch", "width", "depth", "heads", "parameters"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert list(rows) == list(PRESETS) and lines[-1] == "'rrcm info PRESET' for one preset's parts"
    for name, cfg in PRESETS.items():
        assert rows[name][1:7] == [cfg.dataset, *map(str, (cfg.image_size, cfg.patch_size, cfg.embed_dim, cfg.depth,
                                                            cfg.num_heads))]
        assert int(rows[name][7].replace(",", "")) == sum(parameter_counts(cfg).values())
    assert main(["info", "tiny"]) == 0 and capsys.readouterr().out.startswith("tiny: 28 px")
