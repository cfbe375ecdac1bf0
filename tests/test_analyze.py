"""`rrcm analyze` on small hand-made TSVs whose certified accuracies are known."""
from __future__ import annotations

import pytest

from rrcm.cli import main
from rrcm.engine.analyze import read_certificates

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
A = [  # idx label predict radius correct
    (0, 1, 1, 0.30, 1), (1, 2, 2, 0.80, 1), (2, 3, -1, 0.0, 0), (3, 4, 5, 0.9, 0), (4, 0, 0, 0.25, 1)]
B = [(0, 1, 1, 0.6, 1), (1, 2, -1, 0.0, 0), (2, 3, 3, 1.2, 1), (3, 4, 4, 0.1, 1), (4, 0, 0, 0.0, 1)]


def write(path, rows):
    path.write_text(HEADER + "".join(f"{i}\t{l}\t{p}\t{r}\t{c}\t0:00:01.5\n" for i, l, p, r, c in rows))
    return str(path)


def test_table_with_envelope_and_acr(tmp_path, capsys):
    a, b = write(tmp_path / "a.tsv", A), write(tmp_path / "b.tsv", B)
    assert main(["analyze", a, b]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table == [
        f"| radius | {a} | {b} | best |",
        "|---|---|---|---|",
        "| 0 | 60.0 | 80.0 | 80.0 |",
        "| 0.25 | 60.0 | 40.0 | 60.0 |",  # a's 0.25 counts: certified at exactly r
        "| 0.5 | 20.0 | 40.0 | 40.0 |",
        "| 0.75 | 20.0 | 20.0 | 20.0 |",
        "| 1 | 0.0 | 20.0 | 20.0 |",
        "| 1.5 | 0.0 | 0.0 | 0.0 |",
        "| 2 | 0.0 | 0.0 | 0.0 |",
        "| ACR | 0.270 | 0.380 |  |",  # (0.3 + 0.8 + 0.25) / 5 and (0.6 + 1.2 + 0.1) / 5; wrong predictions count 0
        "| images | 5 | 5 |  |",
    ]


def test_versus_puts_two_methods_side_by_side(tmp_path, capsys):
    a, b = write(tmp_path / "a.tsv", A), write(tmp_path / "b.tsv", B)
    plot = tmp_path / "both.png"
    assert main(["analyze", a, "--versus", b, "--radii", "0", "0.25", "1", "--plot", str(plot)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table == [
        f"| radius | {a} | best | {b} | best (versus) | difference |",
        "|---|---|---|---|---|---|",
        "| 0 | 60.0 | 60.0 | 80.0 | 80.0 | -20.0 |",
        "| 0.25 | 60.0 | 60.0 | 40.0 | 40.0 | +20.0 |",
        "| 1 | 0.0 | 0.0 | 20.0 | 20.0 | -20.0 |",
        "| ACR | 0.270 |  | 0.380 |  |  |",
        "| images | 5 |  | 5 |  |  |",
        f"plot: {plot}",
    ]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_custom_radii_single_file_and_plot(tmp_path, capsys):
    a = write(tmp_path / "a.tsv", A)
    plot = tmp_path / "curve.png"
    assert main(["analyze", a, "--radii", "0.3", "0.31", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "| 0.3 | 40.0 |" in out and "| 0.31 | 20.0 |" in out and "best" not in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_on_different_images_are_flagged(tmp_path, capsys):
    a = write(tmp_path / "a.tsv", A)
    c = write(tmp_path / "c.tsv", [(7, 1, 1, 0.5, 1)])
    assert main(["analyze", a, c]) == 0
    assert "different images" in capsys.readouterr().out


def test_reads_cohen_style_radius_format(tmp_path):
    path = tmp_path / "cohen.tsv"
    path.write_text(HEADER + "0\t3\t3\t0.632\t1\t0:00:02.123456\n20\t1\t-1\t0.0\t0\t0:00:02.2\n")
    cert = read_certificates(path)
    assert cert.acr() == pytest.approx(0.316)
    assert list(cert.idx) == [0, 20]


@pytest.mark.parametrize("content, message", [
    ("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0:00:01\n", "not a certify TSV"),
    (HEADER, "no rows"),
    (HEADER + "0\t1\t1\tbig\t1\t0:00:01\n", "malformed row"),
    (HEADER + "0\t1\t1\t-0.5\t1\t0:00:01\n", "radius must be finite and >= 0"),
])
def test_bad_files(tmp_path, capsys, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_arguments(tmp_path, capsys):
    a = write(tmp_path / "a.tsv", A)
    assert main(["analyze", str(tmp_path / "missing.tsv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["analyze", a, "--radii", "-1"]) == 2
    assert "radii must be finite and >= 0" in capsys.readouterr().err


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path):
    import subprocess
    import sys

    a = write(tmp_path / "a.tsv", A * 2000)  # a long table, so that writing outlasts the reader
    proc = subprocess.Popen([sys.executable, "-m", "rrcm", "analyze", a, a, a], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader quits before reading, like `| head` after its lines
    err = proc.stderr.read().decode()
    assert proc.wait() in (0, 1) and "Traceback" not in err, err
