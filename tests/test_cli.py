"""The command line itself: every --help answers without loading torch and describes its own command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from rrcm.cli import COMMANDS
from rrcm.presets import PRESETS, ModelConfig

HELPS = [[name] for name in COMMANDS if name != "export"] + [["export", f] for f in ("onnx", "aoti", "tensorrt")] + [["export"]]
PROBE = """
import contextlib, io, sys
from rrcm.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:] + ["--help"])
print(code, "torch" in sys.modules)
print(out.getvalue())
"""


@pytest.mark.parametrize("command", HELPS, ids=[" ".join(c) for c in HELPS])
def test_help_loads_no_torch_and_describes_its_command(command):
    done = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, timeout=120)
    status, text = done.stdout.split("\n", 1)
    assert status == "0 False", (status, done.stderr[-2000:])  # exit 0, torch never imported
    assert text.startswith(f"usage: rrcm {' '.join(command)}")
    others = {name for name in COMMANDS if name not in command}
    assert not any(f"usage: rrcm {name}" in text for name in others)


def test_info_help_lists_every_preset():
    done = subprocess.run([sys.executable, "-c", PROBE, "info"], capture_output=True, text=True, timeout=120)
    assert all(name in " ".join(done.stdout.split()) for name in PRESETS)


def test_presets_grid_default_is_the_schedules():
    from rrcm.schedule import FINAL_SCALES

    assert ModelConfig().grid_points == FINAL_SCALES


def test_certify_names_the_precisions_the_backend_runs():
    from rrcm.engine import backends, commands

    assert commands.PRECISIONS == tuple(backends.PRECISIONS)  # written out so that --help loads no torch
