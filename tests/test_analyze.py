"""`rrcm analyze` on small hand-made TSVs whose certified accuracies are known."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rrcm.cli import main
from rrcm.engine.analyze import Decisions, _seconds, make_figure, read_results, series_label, summary_line

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
    assert "different images" in capsys.readouterr().err  # notes go to stderr: stdout stays a markdown table


def test_reads_cohen_style_radius_format(tmp_path):
    path = tmp_path / "cohen.tsv"
    path.write_text(HEADER + "0\t3\t3\t0.632\t1\t0:00:02.123456\n20\t1\t-1\t0.0\t0\t0:00:02.2\n")
    cert = read_results(path)
    assert cert.acr() == pytest.approx(0.316)
    assert list(cert.idx) == [0, 20]


@pytest.mark.parametrize("content, message", [
    ("idx\tlabel\ttime\n0\t1\t0:00:01\n", "not a certify or predict TSV"),
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

    a = write(tmp_path / "a.tsv", [(i, *row[1:]) for i, row in enumerate(A * 2000)])  # so that writing outlasts the reader
    proc = subprocess.Popen([sys.executable, "-m", "rrcm", "analyze", a, a, a], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader quits before reading, like `| head` after its lines
    err = proc.stderr.read().decode()
    assert proc.wait() in (0, 1) and "Traceback" not in err, err


def write_tsv(path, header: str, rows, sidecar: dict | None = None) -> str:
    """A TSV with `header`'s columns (tab-separated) and rows of values, and its sidecar FILE.tsv.json when given."""
    path.write_text(header.replace(" ", "\t") + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    if sidecar is not None:
        path.with_name(path.name + ".json").write_text(json.dumps(sidecar))
    return str(path)


def sidecar(**changes) -> dict:
    """What `rrcm certify` records (engine/runner.py, engine/commands.py), with `changes`."""
    return {"command": "certify", "n0": 100, "n": 10000, "alpha": 0.001, "skip": 20, "max": 500, "seed": 0,
            "model": "runs/rrcm-0.25", "sigma": 0.25, "dataset": "fashion-mnist", "backend": "torch",
            "precision": "fp32", **changes}


RADIUS_HEADER = "idx label predict certified samples time"
# certified at r, but a wrong prediction (idx 1) is no certified accuracy; idx 3 abstains
DECISIONS = [(0, 3, 3, 1, 150, "0:00:00.5"), (1, 2, 5, 1, 400, "0:00:00.5"), (2, 1, 1, 0, 1100, "0:00:01"),
             (3, 4, -1, 0, 100, "0:00:00.25"), (4, 7, 7, 1, 250, "0:00:00.25")]


def test_radius_tsv_certified_accuracy_at_its_r(tmp_path, capsys):
    d = write_tsv(tmp_path / "d.tsv", RADIUS_HEADER, DECISIONS, sidecar(n=100000, radius=0.5, beta=0.001))
    result = read_results(d)
    assert isinstance(result, Decisions) and result.r == 0.5 and result.accuracy() == pytest.approx(0.4)
    assert main(["analyze", d]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "| file | r | certified accuracy (%) | samples (mean) | samples (median) | images |",
        "|---|---|---|---|---|---|",
        f"| {d} | 0.5 | 40.0 | 400 | 250 | 5 |",  # mean (150 + 400 + 1100 + 100 + 250) / 5
    ]
    # samples/s: 2,000 samples in 2.5 s of rows
    assert summary_line(d) == "d.tsv: certified accuracy 40.0% at r = 0.5 of 5 images; samples per image: mean 400, " \
                              "median 250; 800 samples/s"


def test_radius_tsv_without_sidecar_says_r_is_unknown(tmp_path, capsys):
    d = write_tsv(tmp_path / "d.tsv", RADIUS_HEADER, DECISIONS)
    assert main(["analyze", d]) == 0
    out, err = capsys.readouterr()
    assert f"| {d} | ? | 40.0 |" in out and "r is unknown" in err


ADAPTIVE_HEADER = "idx label predict radius correct samples time"
ADAPTIVE = [(0, 1, 1, 0.30, 1, 300, "0:00:00.1"), (1, 2, 2, 0.80, 1, 1700, "0:00:00.4"), (2, 3, -1, 0.0, 0, 200, "0:00:00.1"),
            (3, 4, 5, 0.9, 0, 700, "0:00:00.2"), (4, 0, 0, 0.25, 1, 100, "0:00:00.2")]


def test_adaptive_tsv_table_with_samples(tmp_path, capsys):
    ad = write_tsv(tmp_path / "ad.tsv", ADAPTIVE_HEADER, ADAPTIVE, sidecar(adaptive=True, tolerance=0.01))
    fixed = write_tsv(tmp_path / "fixed.tsv", HEADER.strip(), [(*r[:5], "0:00:01") for r in A], sidecar())
    assert main(["analyze", ad, fixed, "--radii", "0", "0.5"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        f"| radius | {ad} | {fixed} | best |",
        "|---|---|---|---|",
        "| 0 | 60.0 | 60.0 | 60.0 |",
        "| 0.5 | 20.0 | 20.0 | 20.0 |",
        "| ACR | 0.270 | 0.270 |  |",
        "| images | 5 | 5 |  |",
        "| samples (mean) | 600 | 10,100 |  |",  # the fixed run spends n0 + n on every image
        "| samples (median) | 300 | 10,100 |  |",
    ]
    assert summary_line(ad) == ("ad.tsv: certified accuracy 60.0 / 60.0 / 20.0 / 0.0% at radius 0 / 0.25 / 0.5 / 1 of 5 "
                                "images, ACR 0.270; samples per image: mean 600, median 300; 3,000 samples/s")
    # 5 images x 10,100 samples in 5 s
    assert summary_line(fixed, processes=2).endswith("ACR 0.270; 10,100 samples/s per process")


def test_predict_tsv_accuracy_and_abstentions(tmp_path, capsys):
    rows = [(0, 1, 1, 1, "0:00:00.5"), (1, 2, -1, 0, "0:00:00.5"), (2, 3, 3, 1, "0:00:00.5"), (3, 4, 0, 0, "0:00:00.5")]
    p = write_tsv(tmp_path / "p.tsv", "idx label predict correct time", rows,
                  sidecar(command="predict", n0=None, n=1000))
    assert main(["analyze", p]) == 0
    assert f"| {p} | 50.0 | 25.0 | 4 |" in capsys.readouterr().out
    assert summary_line(p) == "p.tsv: accuracy 50.0%, abstained 25.0% of 4 images; 2,000 samples/s"  # predict: n each
    assert main(["analyze", p, "--plot", str(tmp_path / "p.png")]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_mixed_kinds_get_one_table_each(tmp_path, capsys):
    a = write(tmp_path / "a.tsv", A)
    d = write_tsv(tmp_path / "d.tsv", RADIUS_HEADER, DECISIONS, sidecar(radius=0.25))
    p = write_tsv(tmp_path / "p.tsv", "idx label predict correct time", [(0, 1, 1, 1, "0:00:01")])
    plot = tmp_path / "mixed.png"
    assert main(["analyze", a, d, "--versus", p, "--plot", str(plot)]) == 0
    tables = capsys.readouterr().out.split("\n\n")
    assert len(tables) == 3
    assert tables[0].startswith(f"| radius | {a} |") and tables[1].startswith("| file | r |")
    assert tables[2].startswith("| file | accuracy (%) | abstained (%) |")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigma_column_is_found_by_name(tmp_path):
    # a cascade: the answering stage's sigma in a column ("-" for an abstention), here before radius to show that
    # order is free
    rows = [(0, 1, 1, 0.25, 0.30, 1, "0:00:01"), (1, 2, 2, 0.5, 0.80, 1, "0:00:01"), (2, 3, 4, 1.0, 0.9, 0, "0:00:01"),
            (3, 3, -1, "-", 0.0, 0, "0:00:01")]
    path = write_tsv(tmp_path / "multi.tsv", "idx label predict sigma radius correct time", rows,
                     sidecar(sigma=[0.25, 0.5, 1.0]))
    cert = read_results(path)
    assert list(cert.radius) == [0.30, 0.80, 0.9, 0.0] and list(cert.correct) == [True, True, False, False]
    assert list(cert.sigma[:3]) == [0.25, 0.5, 1.0] and np.isnan(cert.sigma[3]) and cert.acr() == pytest.approx(1.1 / 4)
    assert series_label(cert, "rRCM") == "rRCM, cascade σ = 1/0.5/0.25"
    # without the sidecar, the sigmas the column holds
    os.remove(path + ".json")
    assert series_label(read_results(path), "rRCM") == "rRCM, σ per image: 0.25/0.5/1"


def test_repeated_idx_counts_once_or_is_refused(tmp_path, capsys):
    # the same row twice (e.g. a run's rows pasted twice), apart from its time: counted once, with a note
    rows = [(*r, "0:00:01") for r in A] + [(*A[0], "0:00:09")]
    same = write_tsv(tmp_path / "same.tsv", HEADER.strip(), rows)
    assert main(["analyze", same, "--radii", "0"]) == 0
    out, err = capsys.readouterr()
    assert "| 0 | 60.0 |" in out and "| images | 5 |" in out
    assert "1 repeated row(s)" in err and "counted once" in err
    # the same image with another result: refused, naming the file, the line and the idx
    other = write_tsv(tmp_path / "other.tsv", HEADER.strip(), [(*r, "0:00:01") for r in A] + [(0, 1, 1, 0.5, 1, "0:00:01")])
    assert main(["analyze", other]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrcm: error: ") and err.count("\n") == 1
    assert "other.tsv: line 7 repeats idx 0 of line 2" in err


@pytest.mark.parametrize("content, message", [
    (HEADER.encode() + b"0\t1\t1\t0.5\t1\t0:00:01\n1\t2\t2\t0.5\xff\t1\t0:00:01\n", "bad.tsv: line 3 is not UTF-8 text"),
    (HEADER.encode() + b"0\t1\t1\t0.5\t1\t0:00:01\n1\t2\t2\t0.5\t1\n", "bad.tsv: line 3: malformed row (5 fields, the header has 6)"),
    (HEADER.encode() + b"0\t1\t1\t0.5\t1\tlate\n", "bad.tsv: line 2: malformed row (time 'late' is not a duration)"),
    (HEADER.encode() + b"0\t1\t1\t0.5\t2\t0:00:01\n", "bad.tsv: line 2: correct must be 0 or 1"),
])
def test_unreadable_rows_name_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rrcm: error: ") and message in err and err.count("\n") == 1, err


def test_time_column_formats():
    assert _seconds("0:00:01.5") == 1.5 and _seconds("1:02:03") == 3723.0
    assert _seconds("2 days, 0:00:10.25") == 2 * 86400 + 10.25 and _seconds("12.5") == 12.5


def legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_plot_legend_and_title_from_sidecars(tmp_path):
    import matplotlib.pyplot as plt

    groups = {}
    for method, sigmas in (("rrcm", (0.25, 0.5)), ("base", (0.25, 0.5))):
        groups[method] = [read_results(write_tsv(tmp_path / f"{method}-{s}.tsv", HEADER.strip(), [(*r, "0:00:01") for r in A],
                                                 sidecar(model=f"fm/{method}-{s}", sigma=s))) for s in sigmas]
    fig = make_figure(groups["rrcm"], groups["base"], ["rRCM", "baseline"])
    assert legend(fig) == ["rRCM, σ = 0.25", "rRCM, σ = 0.5", "rRCM, best over σ",
                           "baseline, σ = 0.25", "baseline, σ = 0.5", "baseline, best over σ"]
    assert fig.axes[0].get_title() == "fashion-mnist: 5 images, n0 = 100, n = 10,000, α = 0.001"
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    r, _, b, _ = lines["rRCM, σ = 0.5"].get_color()
    assert b > r  # the files in blues
    r, _, b, _ = lines["baseline, σ = 0.5"].get_color()
    assert r > b and lines["baseline, σ = 0.5"].get_linestyle() == "--"  # --versus in oranges, dashed
    envelope = lines["rRCM, best over σ"]
    assert envelope.get_zorder() < lines["rRCM, σ = 0.25"].get_zorder() and envelope.get_alpha() < 0.5  # beneath
    assert fig.axes[0].get_ylim() == (0, 100) and "%" in fig.axes[0].get_ylabel()
    plt.close(fig)
    # without --labels: the sidecar's model; without a sidecar: the file name; differing runs: "mixed"
    bare = write(tmp_path / "bare.tsv", A)
    other = write_tsv(tmp_path / "other.tsv", HEADER.strip(), [(*r, "0:00:01") for r in A[:4]],
                      sidecar(model="runs/q", sigma=1.0, n=1000, precision="int8"))
    fig = make_figure(groups["rrcm"] + [read_results(bare), read_results(other)])
    assert legend(fig) == ["rrcm-0.25, σ = 0.25", "rrcm-0.5, σ = 0.5", "bare.tsv", "q, σ = 1, int8", "best"]
    assert fig.axes[0].get_title() == "mixed images, n0 = mixed, n = mixed, α = mixed"
    plt.close(fig)


def test_plot_decisions_as_points_of_their_curve(tmp_path):
    import matplotlib.pyplot as plt

    side = sidecar(model="fashion-mnist", sigma=0.5, n=100000)
    fixed = read_results(write_tsv(tmp_path / "fixed.tsv", HEADER.strip(), [(*r, "0:00:01") for r in A], side))
    decisions = [read_results(write_tsv(tmp_path / f"d{r}.tsv", RADIUS_HEADER, DECISIONS, {**side, "radius": r}))
                 for r in (0.25, 0.5)]
    fig = make_figure([fixed, *decisions])
    assert legend(fig) == ["fashion-mnist, σ = 0.5", "fashion-mnist, σ = 0.5, decision at r"]  # one entry for both
    points = [c.get_offsets()[0].tolist() for c in fig.axes[0].collections]
    assert points == [[0.25, 40.0], [0.5, 40.0]]
    assert fig.axes[0].get_lines()[0].get_color() == tuple(fig.axes[0].collections[0].get_facecolor()[0])  # same series
    plt.close(fig)


def test_labels_need_one_name_per_group(tmp_path, capsys):
    a, b = write(tmp_path / "a.tsv", A), write(tmp_path / "b.tsv", B)
    assert main(["analyze", a, "--versus", b, "--labels", "rRCM"]) == 2
    assert "--labels takes 2 names" in capsys.readouterr().err
    plot = tmp_path / "labelled.png"
    assert main(["analyze", a, "--versus", b, "--labels", "rRCM", "baseline", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_certify_ends_with_a_summary_line(tmp_path, capsys):
    out = tmp_path / "cert.tsv"
    assert main(["certify", "--model", "fashion-mnist", "--sigma", "0.25", "--n0", "10", "--n", "50", "--skip", "1000",
                 "--max", "2", "--device", "cpu", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("cert.tsv: certified accuracy ") and "of 2 images" in last and last.endswith(" samples/s")
    assert last == summary_line(out)


def test_plot_tells_apart_curves_of_one_name(tmp_path):
    import matplotlib.pyplot as plt

    runs = [read_results(write_tsv(tmp_path / f"seed{s}.tsv", HEADER.strip(), [(*r, "0:00:01") for r in rows],
                                   sidecar(seed=s))) for s, rows in ((0, A), (1, B))]
    fig = make_figure(runs)
    assert legend(fig) == ["rrcm-0.25, σ = 0.25 (seed0.tsv)", "rrcm-0.25, σ = 0.25 (seed1.tsv)", "best"]
    colours = [line.get_color() for line in fig.axes[0].get_lines()[:2]]
    assert colours[0] != colours[1]
    plt.close(fig)
