"""Runs the bash and Python blocks of README.md and docs/*.md (Sybil): `python -m pytest -q README.md docs`.

Each page runs top to bottom as a user would type it: from the repository root, with this virtual environment
active and `$SCRATCH` a fresh temporary folder of its own, removed afterwards. Bash blocks run each in its own
`bash -e -o pipefail`, Python blocks share one namespace per page. A block under `<!-- skip: next "REASON" -->` is
reported skipped with its reason (pytest -ra lists them): those that need a GPU or TensorRT, and full-size runs,
whose shortened form follows as an `invisible-code-block`. A page that leaves a new or changed file in the
repository (outside ignored folders such as runs/ and build/) fails: examples write under $SCRATCH.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent
BLOCK_TIMEOUT_S = 900


def _environment(scratch: str) -> dict[str, str]:
    venv = Path(sys.executable).parent
    env = {**os.environ, "SCRATCH": scratch, "VIRTUAL_ENV": str(venv.parent),
           "PATH": f"{venv}{os.pathsep}{os.environ.get('PATH', '')}"}
    # `--precision auto` would time torch.compile for every model a page certifies (half a minute each on two
    # cores); the docs run eager torch, as tests/conftest.py does. Users see the probe once per model.
    env.setdefault("RRCM_AUTO_RUNTIMES", "eager")
    return env


def _repository_changes() -> set[str]:
    """Tracked files changed and untracked files not ignored, as `git status` lists them."""
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True)
    return set(done.stdout.splitlines()) if done.returncode == 0 else set()


def _setup(namespace: dict) -> None:
    scratch = tempfile.mkdtemp(prefix="rrcm-docs-")
    namespace["_saved_environ"] = dict(os.environ)
    namespace["_saved_cwd"] = os.getcwd()
    namespace["_repository"] = _repository_changes()
    environment = _environment(scratch)
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(ROOT)


def _teardown(namespace: dict) -> None:
    scratch = os.environ["SCRATCH"]
    os.chdir(namespace["_saved_cwd"])
    os.environ.clear()
    os.environ.update(namespace["_saved_environ"])
    shutil.rmtree(scratch, ignore_errors=True)
    written = sorted(_repository_changes() - namespace["_repository"])
    assert not written, f"the page wrote into the repository instead of $SCRATCH: {written}"


def _run_bash(example) -> str | None:
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", example.parsed], cwd=ROOT, env=dict(os.environ),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    if done.returncode != 0:
        return f"bash block exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped block is listed by its page and line, not by the unittest module that raised the skip."""
    outcome = yield
    report = outcome.get_result()
    example = getattr(item, "example", None)
    if example is not None and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (str(Path(example.path).relative_to(ROOT)), example.line, report.longrepr[2])


pytest_collect_file = Sybil(
    parsers=[CodeBlockParser("bash", _run_bash), PythonCodeBlockParser(), SkipParser()],
    patterns=["README.md", "docs/*.md"],
    setup=_setup,
    teardown=_teardown,
).pytest()
