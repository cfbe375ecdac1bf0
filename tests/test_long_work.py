"""Long work shows its cost: the estimate a certification prints before its first image, the refusal of work no
machine finishes (unless --force), the bar inside an image that runs long, the time left of a training run.
Rates are simulated (a given rate, or a clock that the test advances): nothing here is timed."""
from __future__ import annotations

import json

import pytest
import torch

from deploy_helpers import SIGMA, tiny_checkpoint
from rrcm import load_classifier
from rrcm.cli import main
from rrcm.engine import Certifier, autoselect, runner
from rrcm.engine.backends import TorchBackend
from rrcm.engine.timing import FEASIBLE_DAYS, INNER_BAR_SECONDS, MEASURE_SECONDS, Meter, TooLong, Workload
from rrcm.eta import DAY, duration
from rrcm.train.loop import MEASURE_STEPS, MEASURE_WARMUP, LoopSettings, eta_line

TINY = ["--preset", "tiny", "--max-train-images", "32", "--batch-size", "16", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


class Clock:
    """A clock that moves only when told."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_durations_read_like_estimates():
    cases = [(0.4, "0 s"), (89, "89 s"), (90, "2 min"), (3599, "60 min"), (5400, "1.5 h"), (2 * DAY - 1, "48.0 h"),
             (2 * DAY, "2.0 days"), (729 * DAY, "729.0 days"), (730 * DAY, "2 years"), (1e13, "316,881 years"),
             (float("inf"), "forever")]
    assert [duration(s) for s, _ in cases] == [text for _, text in cases]


def test_a_workload_is_refused_beyond_its_limit_only():
    work = Workload("certify", 500, 100_100)
    assert work.estimate(1000.0, "measured") == \
        "rrcm: certify of 500 image(s) x 100,100 samples: about 13.9 h at 1,000 samples/s (measured)"
    assert "x at most 100,100 samples: at most about" in Workload("certify", 500, 100_100, at_most=True).estimate(1e3, "")
    limit = work.samples / (FEASIBLE_DAYS * DAY)  # the slowest rate it is allowed at
    work.check(limit, "measured")
    with pytest.raises(TooLong, match=r"^certify of 500 image\(s\) x 100,100 samples would take about 100.1 days at 5.79 "
                                      r"samples/s \(measured\), more than 100 days: lower --n or --max, or give --force"):
        work.check(limit / 1.001, "measured")


def test_a_given_rate_is_estimated_and_checked_before_any_batch():
    lines = []
    meter = Meter(1000.0, "cached", write=lines.append)
    meter.begin(Workload("predict", 10, 1000))
    assert lines == ["rrcm: predict of 10 image(s) x 1,000 samples: about 10 s at 1,000 samples/s (cached)"]
    with pytest.raises(TooLong, match="would take about 317 years"):
        Meter(1000.0, "cached", write=lines.append).begin(Workload("predict", 10, 10**12))
    Meter(1000.0, "cached", force=True, write=lines.append).begin(Workload("predict", 10, 10**12))
    assert lines[-1].endswith("about 317 years at 1,000 samples/s (cached)")
    quiet = []
    with pytest.raises(TooLong):  # not shown (another process of a torchrun), still refused
        Meter(1000.0, write=quiet.append).begin(Workload("predict", 10, 10**12), show=False)
    assert quiet == []
    with pytest.raises(Exception, match="positive number of samples/s"):
        Meter(0.0)


def batches(meter: Meter, clock: Clock, count: int, rows: int, seconds: float) -> None:
    for _ in range(count):
        clock.now += seconds
        meter.on_batch(rows)


def test_a_rate_is_measured_after_the_first_batch():
    clock, lines = Clock(), []
    meter = Meter(clock=clock, write=lines.append)
    meter.begin(Workload("certify", 3, 100_000))
    meter.start_group(100_000)
    clock.now = 30.0
    meter.on_batch(1000)  # the first batch (compilation, first allocations): not measured
    per_batch = MEASURE_SECONDS / 4
    batches(meter, clock, 3, 1000, per_batch)
    assert lines == [] and meter.rate is None
    batches(meter, clock, 1, 1000, per_batch)
    assert meter.rate == pytest.approx(4000 / MEASURE_SECONDS)
    assert lines == [f"rrcm: certify of 3 image(s) x 100,000 samples: about {duration(3e5 / meter.rate)} at "
                     f"{meter.rate:,.0f} samples/s (measured on this run's first images)"]
    batches(meter, clock, 10, 1000, per_batch)
    assert len(lines) == 1  # printed once
    meter.end_group()
    meter.close()
    assert meter.average == pytest.approx(14_000 / (14 * per_batch))


def test_short_groups_are_measured_at_their_end_and_a_measured_rate_refuses_too():
    clock, lines = Clock(), []
    meter = Meter(clock=clock, write=lines.append)
    meter.begin(Workload("certify", 10**9, 200))
    meter.start_group(200)
    batches(meter, clock, 2, 100, 0.05)  # a group far shorter than MEASURE_SECONDS
    assert meter.rate is None
    with pytest.raises(TooLong, match="measured on this run's first images"):
        meter.end_group()
    assert meter.rate == pytest.approx(100 / 0.05)
    assert len(lines) == 1 and "measured on this run's first images" in lines[0]
    calm = Meter(clock=clock, write=lines.append)
    calm.begin(Workload("certify", 10**9, 200), refuse_measured=False)  # processes that must stop together
    calm.start_group(200)
    batches(calm, clock, 3, 100, 0.05)
    calm.end_group()
    assert calm.rate == pytest.approx(2000.0)


def test_a_measured_rate_far_below_the_given_one_is_news():
    clock, lines = Clock(), []
    meter = Meter(1000.0, "cached", clock=clock, write=lines.append)
    meter.begin(Workload("certify", 100, 10_000))
    meter.start_group(10_000)
    batches(meter, clock, 1 + 4, 100, MEASURE_SECONDS / 4)  # 200 samples/s
    assert len(lines) == 2 and lines[1].endswith(
        f"about {duration(1e6 / 200)} at 200 samples/s (measured on this run's first images, far below the 1,000 cached)")
    near = Meter(1000.0, "cached", clock=clock, write=lines.append)
    near.begin(Workload("certify", 100, 10_000))
    near.start_group(10_000)
    batches(near, clock, 1 + 4, 300, MEASURE_SECONDS / 4)  # 600 samples/s: no news
    assert near.rate == pytest.approx(600.0) and len(lines) == 3


def test_an_image_that_runs_long_gets_a_bar_of_its_samples(capsys):
    clock = Clock()
    meter = Meter(clock=clock, write=lambda line: None)
    meter.begin(Workload("certify", 2, 10_000))
    meter.start_group(10_000)
    batches(meter, clock, 10, 100, INNER_BAR_SECONDS / 20)  # half the time: no bar yet
    assert "this image" not in capsys.readouterr().err
    batches(meter, clock, 20, 100, INNER_BAR_SECONDS / 20)
    meter.end_group()
    assert "this image" in capsys.readouterr().err
    meter.start_group(10_000)
    batches(meter, clock, 5, 100, 0.01)
    meter.end_group()
    meter.close()
    assert "this image" not in capsys.readouterr().err
    hidden = Meter(clock=clock, write=lambda line: None)
    hidden.begin(Workload("certify", 2, 10_000), show=False)
    hidden.start_group(10_000)
    batches(hidden, clock, 30, 100, INNER_BAR_SECONDS)
    hidden.close()
    assert "this image" not in capsys.readouterr().err


def test_samplers_report_each_batch_and_count_the_same(sampler, device):
    certifier = Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA, batch_size=48, device=device, sampler=sampler)
    images = torch.rand(3, 1, 28, 28)
    plain = certifier.certify_many(images, 20, 70, 0.01, seeds=[1, 2, 3])
    rows = []
    certifier.sampler.on_batch = rows.append
    watched = certifier.certify_many(images, 20, 70, 0.01, seeds=[1, 2, 3])
    certifier.sampler.on_batch = None
    assert [r.counts.tolist() for r in watched] == [r.counts.tolist() for r in plain]
    assert [(r.prediction, r.radius) for r in watched] == [(r.prediction, r.radius) for r in plain]
    assert sum(rows) == 3 * (20 + 70) and max(rows) <= 48 and len(rows) >= 3 * 90 // 48


@pytest.fixture
def simulated_rate(monkeypatch):
    """--precision auto answers with eager torch at the rate the test sets (a cached choice: nothing timed)."""
    rate = {"eager": 50.0}

    def select(model, fingerprint, batch, device, **kwargs):
        return TorchBackend(model, device), autoselect.Choice("eager", dict(rate), source="cache", digest="d")

    monkeypatch.setattr(autoselect, "select_runtime", select)
    return rate


def certify(out, *extra) -> list[str]:
    return ["certify", "--model", str(tiny_checkpoint()), "--out", str(out), "--device", "cpu", "--batch", "64",
            "--n0", "10", *extra]


def test_certify_refuses_work_no_machine_finishes_and_leaves_nothing(tmp_path, simulated_rate, capsys):
    out = tmp_path / "c.tsv"
    assert main(certify(out, "--n", str(10**9), "--max", "3")) == 2
    captured = capsys.readouterr()
    assert "rrcm: certify of 3 image(s) x 1,000,000,010 samples: about 694.4 days at 50 samples/s" in captured.out
    error = [line for line in captured.err.splitlines() if line.startswith("rrcm: error: ")]
    assert error == ["rrcm: error: certify of 3 image(s) x 1,000,000,010 samples would take about 694.4 days at 50 "
                     "samples/s (the model's rate that --precision auto timed), more than 100 days: lower --n or --max, "
                     "or give --force to run it anyway"]
    assert list(tmp_path.iterdir()) == []  # no TSV, no sidecar, no lock
    assert main(certify(out, "--n", str(10**9), "--max", "3", "--radius", "0.1")) == 2  # a mode that stops early
    captured = capsys.readouterr()
    assert "x at most 1,000,000,010 samples: at most about 694.4 days" in captured.out
    assert "image(s) x at most 1,000,000,010 samples would take about 694.4 days" in captured.err


def test_force_runs_it_and_a_resumed_run_counts_what_is_left(tmp_path, simulated_rate, capsys):
    simulated_rate["eager"] = 1e-5  # 110 samples an image: 127 days an image
    out = tmp_path / "c.tsv"
    assert main(certify(out, "--n", "100", "--max", "1")) == 2
    assert "127.3 days" in capsys.readouterr().err and not out.exists()
    assert main(certify(out, "--n", "100", "--max", "1", "--force")) == 0
    assert "about 127.3 days at 1e-05 samples/s" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2 and "force" not in json.loads(out.with_name("c.tsv.json").read_text())
    assert main(certify(out, "--n", "100", "--max", "2")) == 2  # one image left: refused, the finished row kept
    assert "certify of 1 image(s)" in capsys.readouterr().err and len(out.read_text().splitlines()) == 2
    for mode in ("certify", "predict"):
        assert main([mode, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--force run even when the estimate" in text and f"exceeds {FEASIBLE_DAYS} days" in text


def test_a_run_refused_on_its_measured_rate_leaves_nothing(tmp_path, monkeypatch):
    """The runner with a clock that moves a second a reading: a rate of a few samples/s, measured in the first image."""
    from rrcm.data import load_dataset

    clock = Clock()

    def tick() -> float:
        clock.now += 1.0
        return clock.now

    certifier = Certifier(load_classifier(tiny_checkpoint()), 10, SIGMA, batch_size=16)
    out = tmp_path / "c.tsv"
    job = runner.Job("certify", 10**9, 0.001, n0=10, max_images=2)
    meter = Meter(clock=tick, write=lambda line: None)
    with pytest.raises(TooLong, match="measured on this run's first images"):
        runner.run(certifier, load_dataset("fashion-mnist", "test"), out, job, {"model": "tiny"}, meter=meter,
                   progress=False)
    assert list(tmp_path.iterdir()) == [] and certifier.sampler.on_batch is None


def test_training_prints_the_time_left_after_its_first_timed_steps(tmp_path, capsys):
    s = LoopSettings(1000, warmup=10, lr=1e-3, batch_size=16, log_every=10, save_every=0, num_images=64)
    assert eta_line("pretrain", s, 12, 0.5, 6.0) == \
        "rrcm pretrain: about 8 min for the 988 steps left (500.0 ms a step over steps 3-12)"
    budget = LoopSettings(1000, 10, 1e-3, 16, 10, 0, 64, time_budget=100.0)
    assert eta_line("pretrain", budget, 12, 0.5, 20.0).endswith("; the time budget stops it in about 80 s")
    steps = MEASURE_WARMUP + MEASURE_STEPS + 1
    assert main(["pretrain", *TINY, "--steps", str(steps), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "for the 1 steps left (" in printed and f"over steps {MEASURE_WARMUP + 1}-{steps - 1})" in printed
    assert main(["pretrain", *TINY, "--steps", str(steps - 1), "--out", str(tmp_path / "short")]) == 0
    assert "steps left" not in capsys.readouterr().out  # nothing left after the timed steps: nothing to say
