"""Pre-training and fine-tuning: objective pieces, schedules, resume equality, CLI runs and bad input."""
import argparse
import copy
import dataclasses
import gzip
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils import _pytree as pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import rrcm
from rrcm.cli import main
from rrcm.data import TensorImageDataset
from rrcm.model import Classifier, Encoder
from rrcm.presets import get_preset
from rrcm.schedule import grid_time_for_sigma, karras_times
from rrcm.sigma_set import SigmaSet
from rrcm.train import finetune, loop, pretrain
from rrcm.distributed import DistEnv
from rrcm.train.losses import info_nce

TINY = get_preset("tiny")
aten = torch.ops.aten


def write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">4B", 0, 0, 8, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    """A small Fashion-MNIST-shaped IDX folder: class c is a bright horizontal band at row 2c + noise."""
    root = tmp_path_factory.mktemp("fmnist")
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 96), ("t10k", 40)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for c in range(10):
            images[labels == c, 2 * c + 4: 2 * c + 7] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def common(data_dir: Path, out: Path, **kw) -> list[str]:
    opts = {"--data-dir": data_dir, "--out": out, "--batch-size": 16, "--log-every": 1, "--seed": 3, **kw}
    return [str(x) for kv in opts.items() for x in kv]


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- the pre-training objective ----------------------------------------------------------------------

def objective_inputs(batch: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, a, b = (torch.rand(batch, *TINY.input_shape, generator=g) * 2 - 1 for _ in range(3))
    return x, a, b, torch.randn(x.shape, generator=g)


def grads_of(loss: torch.Tensor, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_consistency_target_is_stop_gradient(monkeypatch):
    torch.manual_seed(0)
    enc = Encoder(TINY)
    target = Encoder(TINY)
    online = pretrain.OnlineNet(enc)
    x, a, b, n = objective_inputs()
    t_cur, t_next = 1.2, 0.9
    with torch.no_grad():
        constant = enc.features(x + t_next * n, torch.full((len(x),), t_next))

    def run(target_fn, gather_fn=pretrain.gather_keys):
        monkeypatch.setattr(pretrain, "consistency_target", target_fn)
        monkeypatch.setattr(pretrain, "gather_keys", gather_fn)
        loss, parts = pretrain.rrcm_loss(online, enc, target, x, a, b, n, t_cur, t_next)
        return loss, parts, grads_of(loss, enc)

    def same(g1, g2):
        return g1.keys() == g2.keys() and all(torch.allclose(g1[k], g2[k], rtol=1e-5, atol=1e-7) for k in g1)

    real = pretrain.consistency_target
    with_grad = lambda encoder, x_t, t: encoder.features(x_t, torch.full((len(x_t),), t))  # noqa: E731
    loss, parts, grads = run(real)
    loss_c, _, grads_c = run(lambda encoder, x_t, t: constant)
    assert torch.equal(loss, loss_c) and same(grads, grads_c)
    # Stop-gradient holds in the target itself, not only through the gathering of keys...
    _, _, grads_keep = run(real, gather_fn=lambda t: t)
    assert same(grads, grads_keep)
    # ...and the check can fail: gradient through the t_{i+1} branch changes the encoder's gradient.
    loss_g, _, grads_g = run(with_grad, gather_fn=lambda t: t)
    assert torch.equal(loss, loss_g) and not same(grads, grads_g)
    # The consistency term is InfoNCE between h at t_i and the constant at t_{i+1}.
    h = enc.features(x + t_cur * n, torch.full((len(x),), t_cur))
    assert parts["consistency"].item() == pytest.approx(info_nce(h, constant).mean().item(), rel=1e-5)


def test_target_network_gets_no_gradient_and_ema_moves_it():
    torch.manual_seed(0)
    enc, target = Encoder(TINY), Encoder(TINY).requires_grad_(False)
    x, a, b, n = objective_inputs()
    loss, _ = pretrain.rrcm_loss(pretrain.OnlineNet(enc), enc, target, x, a, b, n, 2.0, 1.5)
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in enc.parameters())
    before = [p.clone() for p in target.parameters()]
    pretrain.ema_update(target, enc, 0.9)
    for old, new, online in zip(before, target.parameters(), enc.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * online, atol=1e-6)


# --- schedules and bookkeeping -------------------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine():
    assert loop.lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert loop.lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert loop.lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert loop.lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert loop.lr_factor(19, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert loop.lr_factor(0, 0, 10) == pytest.approx(1.0)


def test_layer_decay_and_weight_decay_groups():
    cfg = TINY
    model = Classifier(cfg)
    scale = finetune.layer_decay_scale(cfg, 0.5)
    assert scale("linear_head.weight") == 1.0
    assert scale("base_model.norm.weight") == 1.0
    assert scale("base_model.blocks.1.mlp.fc1.weight") == 0.5  # depth 2: last block decay^1
    assert scale("base_model.blocks.0.attn.qkv.weight") == 0.25
    assert scale("base_model.patch_embed.proj.weight") == 0.125
    assert scale("base_model.pos_embed") == 0.125
    groups = loop.param_groups(model, 0.05, scale)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["linear_head.weight"])]["weight_decay"] == 0.05
    for name in ("linear_head.bias", "base_model.pos_embed", "base_model.cls_token", "base_model.norm.weight"):
        assert by_param[id(named[name])]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1.0)
    loop.set_lr(opt, 2e-3)
    assert by_param[id(named["base_model.blocks.0.attn.qkv.weight"])]["lr"] == pytest.approx(5e-4)


def test_batch_order_epochs_and_process_shares():
    order = loop.BatchOrder(10, 4, seed=5)
    assert order.steps_per_epoch == 2
    epoch0 = torch.cat([order.indices(s, DistEnv()) for s in range(2)])
    assert len(set(epoch0.tolist())) == 8  # no repeats within an epoch
    assert torch.equal(order.indices(1, DistEnv()), loop.BatchOrder(10, 4, seed=5).indices(1, DistEnv()))
    assert not torch.equal(order.indices(0, DistEnv()), order.indices(2, DistEnv()))  # a fresh permutation
    halves = [order.indices(3, DistEnv(rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat(halves), order.indices(3, DistEnv()))


def test_derived_seeds_differ_per_part():
    seeds = {loop.derive_seed(0, step, rank, stream) for step in range(5) for rank in range(2) for stream in range(3)}
    assert len(seeds) == 30 and all(0 <= s < 2**63 for s in seeds)


def test_finetune_trains_the_head_and_the_whole_network(fmnist_dir):
    args = main_args("finetune", ["--from-scratch", "--preset", "tiny", "--sigma", "0.5", *common(fmnist_dir, "unused")])
    env = DistEnv()
    cfg = loop.model_config(args)
    data = loop.load_train_data(args, cfg, env.device)
    args.lam = finetune.default_lam(args.sigma)
    trainer = finetune.Finetuner(cfg, None, data, args, env, "fp32", layer_decay=1.0)
    loss, parts = trainer.step_loss(0)
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["linear_head.weight"].abs().sum() > 0 and grads["linear_head.bias"].abs().sum() > 0
    assert grads["base_model.patch_embed.proj.weight"].abs().sum() > 0
    assert set(parts) == {"ce", "kl", "entropy", "accuracy"}
    # At the start the head is ~0: uniform predictions, CE = ln 10 and entropy = ln 10.
    assert parts["ce"].item() == pytest.approx(math.log(10), abs=1e-3)
    assert parts["entropy"].item() == pytest.approx(math.log(10), abs=1e-3)


def main_args(command: str, argv: list[str]):
    from rrcm.cli import build_parser

    return build_parser(command).parse_args([command, *argv])


def test_default_lambda_follows_the_paper():
    assert finetune.default_lam(0.25) == 10 and finetune.default_lam(0.5) == 20 and finetune.default_lam(1.0) == 20


# --- one classifier for several sigmas ----------------------------------------------------------------------

def test_noise_levels_of_a_list_are_uniform_per_image_with_their_grid_time_and_lambda():
    from scipy.stats import chisquare

    sigmas = (0.25, 0.5, 1.0)
    levels = finetune.NoiseLevels(SigmaSet(values=sigmas), 81, None, torch.device("cpu"))
    t_noise, t_cond, lam = levels.draw(30_000, torch.Generator().manual_seed(0))
    assert t_noise.shape == t_cond.shape == lam.shape == (30_000,)
    drawn = {}
    for sigma in sigmas:
        mine = t_noise == 2 * sigma
        drawn[sigma] = int(mine.sum())
        assert (t_cond[mine] == torch.tensor(grid_time_for_sigma(sigma, 81), dtype=torch.float32)).all()
        assert (lam[mine] == finetune.default_lam(sigma)).all()
    assert sum(drawn.values()) == 30_000
    assert chisquare(list(drawn.values())).pvalue > 1e-3, drawn
    # An explicit --lam weighs every sigma alike; one sigma gives plain numbers, as before.
    assert (finetune.NoiseLevels(SigmaSet(values=sigmas), 81, 3.0, torch.device("cpu")).draw(
        10, torch.Generator().manual_seed(0))[2] == 3.0).all()
    assert finetune.NoiseLevels(SigmaSet(values=(0.5,)), 81, 20.0, torch.device("cpu")).draw(10, None) == (
        1.0, grid_time_for_sigma(0.5, 81), 20.0)


def test_noise_levels_of_a_range_are_log_uniform_on_the_grid():
    from scipy.stats import kstest

    lo, hi = 0.12, 1.0
    levels = finetune.NoiseLevels(SigmaSet(bounds=(lo, hi)), 81, None, torch.device("cpu"))
    t_noise, t_cond, lam = levels.draw(20_000, torch.Generator().manual_seed(1))
    sigma = t_noise.double() / 2
    assert lo <= sigma.min() and sigma.max() <= hi
    u = (sigma.log() - math.log(lo)) / (math.log(hi) - math.log(lo))  # uniform on [0, 1] if log-uniform
    assert kstest(u.numpy(), "uniform").pvalue > 1e-3
    assert kstest(((sigma - lo) / (hi - lo)).numpy(), "uniform").pvalue < 1e-6  # and not uniform in sigma
    grid = karras_times(81).float()
    assert torch.equal(t_cond, grid[(grid[None] - t_noise[:, None]).abs().argmin(1)])
    assert torch.equal(lam, torch.where(sigma <= 0.25, 10.0, 20.0).float())


def test_noisy_copies_of_an_image_share_its_noise_level():
    x = torch.full((3, 1, 64, 64), 0.5)  # model space 0: the copies are pure noise
    t = torch.tensor([0.1, 1.0, 3.0])
    noisy = finetune.noisy_copies(x, 2, t, torch.Generator().manual_seed(0))
    stds = noisy.flatten(1).std(1).view(2, 3)
    torch.testing.assert_close(stds, t.expand(2, 3), rtol=0.05, atol=0)
    assert torch.equal(finetune.copy_times(t, 2, 3, torch.device("cpu")), torch.cat([t, t]))


def test_consistency_weight_per_image_weighs_each_images_terms():
    from rrcm.train.losses import consistency_finetune_loss

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 10, generator=g) for _ in range(2)]
    labels = torch.tensor([1, 2, 3, 4])
    lam = torch.tensor([10.0, 20.0, 10.0, 0.0])
    loss, parts = consistency_finetune_loss(logits, labels, lam, 0.5)
    alone = [consistency_finetune_loss([z[i:i + 1] for z in logits], labels[i:i + 1], float(lam[i]), 0.5)[0]
             for i in range(4)]
    torch.testing.assert_close(loss, torch.stack(alone).mean())
    torch.testing.assert_close(consistency_finetune_loss(logits, labels, torch.full((4,), 20.0), 0.5)[0],
                               consistency_finetune_loss(logits, labels, 20.0, 0.5)[0])


@pytest.mark.parametrize("noise, recorded, evaluated", [
    (["--sigmas", "1.0,0.25,0.5"], {"sigmas": [0.25, 0.5, 1.0]}, ["0.25", "0.5", "1"]),
    (["--sigma-range", "0.25:1"], {"sigma_range": [0.25, 1.0]}, ["0.25", "0.5", "1"]),
])
def test_finetune_several_sigmas_records_them_and_loads_for_each(noise, recorded, evaluated, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "clf"
    argv = ["finetune", "--from-scratch", "--preset", "tiny", *noise, "--steps", "3", "--eval-images", "20",
            *common(fmnist_dir, out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    config = rrcm.checkpoint.read_config(out)
    assert {k: config[k] for k in recorded} == recorded and "sigma" not in config
    assert sorted(config["test_accuracy"]) == evaluated and config["test_images"] == 20
    for sigma in evaluated:
        assert f"accuracy at sigma {sigma} (one noisy draw per image)" in printed
    for sigma in (0.25, 0.5, 1.0):
        assert rrcm.load_classifier(out, sigma).t == pytest.approx(grid_time_for_sigma(sigma))
    with pytest.raises(rrcm.UserError, match="give the sigma to use"):
        rrcm.load_classifier(out)
    log = read_log(out)
    assert main(argv) == 0  # finished and evaluated: a rerun repeats nothing
    assert read_log(out) == log


# --- command line: smoke runs, resume, bad input ----------------------------------------------------------

@pytest.fixture(scope="module")
def encoder_dir(fmnist_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "enc"
    assert main(["pretrain", "--preset", "tiny", "--steps", "4", *common(fmnist_dir, out)]) == 0
    return out


def test_pretrain_cli_writes_checkpoint_state_and_log(encoder_dir):
    config = rrcm.checkpoint.read_config(encoder_dir)
    assert config["kind"] == "encoder" and config["step"] == 4 and config["model"] == TINY
    assert (encoder_dir / "train_state.pt").is_file()
    log = read_log(encoder_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for record in log:
        assert {"step", "loss", "contrastive", "consistency", "lr", "ema", "num_scales", "images_per_s"} <= set(record)
        assert record["loss"] == pytest.approx(record["contrastive"] + record["consistency"], abs=1e-5)
        assert math.isfinite(record["loss"]) and record["images_per_s"] > 0
    assert log[0]["ema"] == pytest.approx(0.99) and log[0]["num_scales"] == 21
    # Warm-up (a tenth of 4 steps = 0) is empty: cosine from the first step.
    assert log[0]["lr"] == pytest.approx(5e-4)
    weights = load_file(str(encoder_dir / "model.safetensors"))
    assert any(k.startswith("projection_head.") for k in weights)


def test_finetune_from_encoder_loads_with_load_classifier(encoder_dir, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "clf"
    argv = ["finetune", "--init", str(encoder_dir), "--sigma", "0.25", "--steps", "3", "--eval-images", "20",
            *common(fmnist_dir, out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "accuracy at sigma 0.25" in printed and "first 20 test images" in printed
    config = rrcm.checkpoint.read_config(out)
    assert config["kind"] == "classifier" and config["sigma"] == 0.25 and config["dataset"] == "fashion-mnist"
    assert config["init"] == str(encoder_dir.resolve()) and 0 <= config["test_accuracy"] <= 1
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 3]
    assert {"ce", "kl", "entropy", "accuracy", "lr", "images_per_s"} <= set(log[0])
    assert log[-1]["test_images"] == 20
    # Re-running the finished command repeats neither training nor evaluation.
    assert main(argv) == 0
    assert f"{100 * config['test_accuracy']:.2f}%" in capsys.readouterr().out
    assert read_log(out) == log
    clf = rrcm.load_classifier(out)
    assert clf.sigma == 0.25 and clf.t == pytest.approx(0.4927, abs=1e-4)
    assert clf(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    # The encoder's weights (not the projector) were the starting point.
    enc = load_file(str(encoder_dir / "model.safetensors"))
    assert not any(k.startswith("base_model.projection_head") for k in load_file(str(out / "model.safetensors")))
    assert "patch_embed.proj.weight" in enc


def test_finetune_from_scratch_and_steps_from_epochs(fmnist_dir, tmp_path):
    out = tmp_path / "scratch"
    argv = ["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "1.0", "--epochs", "0.5", "--eval-images", "0",
            *common(fmnist_dir, out)]
    assert main(argv) == 0
    config = rrcm.checkpoint.read_config(out)
    assert config["init"] == "scratch" and config["sigma"] == 1.0 and "test_accuracy" not in config
    assert len(read_log(out)) == 3  # half an epoch of 96 images in batches of 16
    assert rrcm.load_classifier(out).t == pytest.approx(2.0036, abs=1e-4)


class Killed(KeyboardInterrupt):
    pass


def run_killed(monkeypatch, cls, argv: list[str], at_step: int, nth: int = 1) -> None:
    """Run `argv` but stop it, like a kill, when step `at_step` begins for the `nth` time (a time budget's
    measuring steps come first)."""
    original, seen = cls.step_loss, []

    def step_loss(self, step):
        seen.append(step)
        if seen.count(at_step) == nth:
            raise Killed
        return original(self, step)

    with monkeypatch.context() as m:
        m.setattr(cls, "step_loss", step_loss)
        assert main(argv) == 130


def six_steps(command: str, *options: str) -> list[str]:
    """Options of a 6-step run of `command` on preset tiny that saves every 2 steps (fine-tuning: from scratch)."""
    extra = ["--preset", "tiny", "--steps", "6", "--save-every", "2", *options]
    return extra + (["--from-scratch", "--sigma", "0.5"] if command == "finetune" else [])


def straight_and_killed(command: str, extra: list[str], fmnist_dir: Path, tmp_path: Path, monkeypatch,
                        nth: int = 1) -> tuple[Path, Path]:
    """Run folders of `command extra` run through, and run until step 3 begins the `nth` time, then killed."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([command, *extra, *common(fmnist_dir, straight)]) == 0
    cls = pretrain.Pretrainer if command == "pretrain" else finetune.Finetuner
    run_killed(monkeypatch, cls, [command, *extra, *common(fmnist_dir, resumed)], at_step=3, nth=nth)
    return straight, resumed


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_kill_and_resume_gives_identical_weights(command, fmnist_dir, tmp_path, monkeypatch):
    extra = six_steps(command, *(["--eval-images", "0"] if command == "finetune" else []))
    straight, resumed = straight_and_killed(command, extra, fmnist_dir, tmp_path, monkeypatch)
    assert torch.load(resumed / "train_state.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in read_log(resumed)] == [1, 2, 3]
    with open(resumed / "log.jsonl", "a") as f:  # a line the kill cut off
        f.write('{"step": 4, "lo')
    assert main([command, *extra, *common(fmnist_dir, resumed)]) == 0
    assert same_weights(straight, resumed)
    s1 = torch.load(straight / "train_state.pt", weights_only=True)
    s2 = torch.load(resumed / "train_state.pt", weights_only=True)
    assert s1["step"] == s2["step"] == 6
    if command == "pretrain":
        assert all(torch.equal(s1["target"][k], s2["target"][k]) for k in s1["target"])
    # The log of the resumed run has each step once, with the uninterrupted run's losses.
    log1, log2 = read_log(straight), read_log(resumed)
    assert [r["step"] for r in log2] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log1] == [r["loss"] for r in log2]
    # A finished run re-run is a no-op that keeps the weights.
    assert main([command, *extra, *common(fmnist_dir, resumed)]) == 0
    assert same_weights(straight, resumed)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("rrcm: error: ")
    return err[0]


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--preset", "huge"], "unknown preset 'huge'"),
    (["pretrain", "--preset", "tiny", "--steps", "0"], "--steps must be positive"),
    (["pretrain", "--preset", "tiny", "--lr", "nan"], "--lr must be positive"),
    (["pretrain", "--preset", "tiny", "--time-budget", "0"], "--time-budget must be positive"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0.5", "--time-budget", "nan"], "--time-budget must be positive"),
    (["pretrain", "--preset", "tiny", "--batch-size", "500"], "larger than the 96 training images"),
    (["pretrain", "--preset", "tiny", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["pretrain", "--preset", "tiny", "--embed-dim", "33"], "embed_dim 33 must be even"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0"], "sigma must be a positive number"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "-0.5"], "sigma must be a positive number"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "nan"], "sigma must be a positive number"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0.5", "--steps", "0"], "--steps must be positive"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0.5", "--layer-decay", "1.5"], "--layer-decay"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigmas", "0.5,0.25,0.5"], "--sigmas: each sigma once"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigmas", "0.5,0"], "each sigma must be a positive number"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma-range", "1:0.25"], "lower end must be below the upper"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma-range", "0.25"], "--sigma-range: LO:HI"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigmas", "0.25,1", "--lam", "nan"], "--lam must be >= 0"),
])
def test_bad_input_is_a_one_line_error(argv, message, fmnist_dir, tmp_path, capsys):
    assert main([argv[0], *common(fmnist_dir, tmp_path / "out"), *argv[1:]]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "out" / "config.json").exists()


def test_missing_data_folder(tmp_path, capsys):
    argv = ["pretrain", "--preset", "tiny", *common(tmp_path / "nowhere", tmp_path / "out")]
    assert main(argv) == 2
    assert "nowhere" in error_line(capsys)


def test_init_must_be_an_encoder_or_classifier_checkpoint(encoder_dir, fmnist_dir, tmp_path, capsys):
    base = ["finetune", "--sigma", "0.5", *common(fmnist_dir, tmp_path / "out")]
    assert main([*base, "--init", str(tmp_path)]) == 2
    assert "not a checkpoint folder" in error_line(capsys)
    other = tmp_path / "other"
    rrcm.checkpoint.save_checkpoint(other, Encoder(TINY), TINY, kind="denoiser")
    assert main([*base, "--init", str(other)]) == 2
    assert "not a pre-trained encoder or a classifier" in error_line(capsys)
    assert main([*base, "--init", str(encoder_dir), "--preset", "tiny"]) == 2
    assert "--preset" in error_line(capsys)


def test_finetune_from_a_classifier_starts_from_its_encoder_with_a_new_head(fmnist_dir, tmp_path):
    torch.manual_seed(11)
    source = Classifier(TINY)
    for param in source.parameters():  # nothing left at its initial value: a loaded weight is told from a fresh one
        torch.nn.init.normal_(param)
    clf = rrcm.checkpoint.save_checkpoint(tmp_path / "clf", source, TINY, kind="classifier", sigma=0.5)
    args = main_args("finetune", ["--init", str(clf), "--sigmas", "0.25,1", *common(fmnist_dir, tmp_path / "out")])
    data = TensorImageDataset("fashion-mnist", 10, torch.zeros(4, *TINY.input_shape, dtype=torch.uint8), torch.arange(4))
    trainer = finetune.Finetuner(finetune.encoder_config(args.init), clf, data, args, DistEnv(), "fp32", layer_decay=0.65)
    got = trainer.model.state_dict()
    for name, value in source.state_dict().items():
        assert torch.equal(got[name], value) == name.startswith("base_model."), name
    fresh = Classifier(TINY).linear_head
    assert torch.equal(got["linear_head.bias"], fresh.bias) and got["linear_head.weight"].std() < 1e-3


def test_diversity_option_parses_is_validated_and_recorded(fmnist_dir, tmp_path, capsys):
    assert main_args("finetune", ["--from-scratch", "--sigma", "1", "--out", "o"]).diversity == 0.0
    base = ["finetune", "--from-scratch", "--preset", "tiny", "--sigmas", "0.25,1", "--steps", "2", "--eval-images", "0"]
    for bad in ("-1", "nan", "inf"):
        assert main([*base, *common(fmnist_dir, tmp_path / "bad"), "--diversity", bad]) == 2
        assert "--diversity must be >= 0" in error_line(capsys)
    assert not (tmp_path / "bad" / "config.json").exists()
    for weight, out in ((2.5, tmp_path / "on"), (0.0, tmp_path / "off")):
        assert main([*base, *common(fmnist_dir, out), "--diversity", str(weight)]) == 0
        assert rrcm.checkpoint.read_config(out)["diversity"] == weight
        recipe = torch.load(out / "train_state.pt", weights_only=True)["recipe"]
        assert recipe.get("diversity", 0.0) == weight
        logged = read_log(out)[-1]
        assert ({"unrecovered", "spread"} <= set(logged)) == (weight > 0)
    # A different weight is another run: resuming refuses it.
    capsys.readouterr()
    assert main([*base, *common(fmnist_dir, tmp_path / "on"), "--diversity", "1"]) == 2
    assert "other settings (diversity)" in error_line(capsys)


def test_resume_refuses_a_folder_with_other_settings(encoder_dir, fmnist_dir, capsys):
    before = (encoder_dir / "model.safetensors").read_bytes()
    assert main(["pretrain", "--preset", "tiny", "--steps", "4", *common(fmnist_dir, encoder_dir), "--lr", "1e-3"]) == 2
    assert "other settings (lr)" in error_line(capsys)
    argv = ["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0.5", *common(fmnist_dir, encoder_dir)]
    assert main(argv) == 2
    assert "of kind 'encoder', not 'classifier'" in error_line(capsys)
    assert (encoder_dir / "model.safetensors").read_bytes() == before


def test_help_explains_every_option(capsys):
    for command in ("pretrain", "finetune"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        for option in ("--preset", "--steps", "--batch-size", "--lr", "--warmup", "--weight-decay", "--out",
                       "--save-every", "--seed", "--log-every", "--device", "--data-dir", "--max-train-images",
                       "--time-budget"):
            assert option in text
    main(["finetune", "--help"])
    text = capsys.readouterr().out
    for option in ("--init", "--from-scratch", "--sigma", "--lam", "--eta", "--layer-decay", "--epochs", "--eval-images"):
        assert option in text


# --- the data path on the training device ---------------------------------------------------------------

def test_tensor_dataset_moves_whole_and_gathers_batches_where_it_is():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = TensorImageDataset("fashion-mnist", 10, images, torch.arange(12) % 10)
    moved = data.to("meta")  # a device that is not the host's: shapes and dtypes only
    assert moved.device == torch.device("meta") and moved.images.dtype == torch.uint8
    batch, labels = moved.batch(torch.tensor([3, 1], device="meta"))
    assert batch.device.type == "meta" and batch.shape == (2, 1, 28, 28) and batch.dtype == torch.float32
    assert labels.device.type == "meta"
    # On the host, gathering is the old per-item conversion.
    x, y = data.to("cpu").batch(torch.tensor([3, 1]))
    assert torch.equal(x, torch.stack([data[3][0], data[1][0]])) and y.tolist() == [3, 1]
    assert loop.Subset(moved, 5).device == torch.device("meta")


def test_batch_order_sends_each_epoch_once_and_slices_it_on_the_device():
    on_host, on_device = loop.BatchOrder(10, 4, seed=5), loop.BatchOrder(10, 4, seed=5, device=torch.device("meta"))
    for step in range(5):
        assert on_device.indices(step, DistEnv()).device.type == "meta"
        assert on_device.indices(step, DistEnv()).shape == on_host.indices(step, DistEnv()).shape == (4,)
    perm = on_device._perm
    on_device.indices(5, DistEnv())
    assert on_device._perm is perm  # epoch 2 still: no new permutation, no new copy


def test_training_data_is_held_on_the_training_device(fmnist_dir):
    args = main_args("pretrain", ["--preset", "tiny", *common(fmnist_dir, "unused"), "--max-train-images", "50"])
    data = loop.load_train_data(args, loop.model_config(args), torch.device("meta"))
    assert len(data) == 50 and data.device == torch.device("meta")


FACTORIES = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.full, torch.zeros, torch.ones, torch.empty,
             torch.arange, torch.linspace, torch.tensor}


class HostReads(TorchDispatchMode):
    """Records the reads to the host of values a GPU run keeps on its device, on a CPU.

    Every tensor is on the host here, so "on the device" is followed by provenance. Device tensors are
    the given ones (parameters, buffers, the dataset), what a factory makes and `.to` returns when told
    a torch.device (the training device, x.device...: the code spells a host tensor's device "cpu", and
    a factory told none makes a host tensor on a GPU machine too), and every output (and written
    argument) of an op with a device tensor among its inputs. A read is an op whose result the host
    waits for: a scalar (item, int, float, bool), nonzero and boolean masks, torch.equal, unique, ...,
    and tolist / numpy / cpu. torch.tensor(data, device=...) counts too: a copy from pageable host
    memory, which waits for the device as well.
    """

    READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten.is_nonzero,
             aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.bincount, aten.repeat_interleave}

    def __init__(self, device_tensors):
        super().__init__()
        self.on_device = {}  # id -> tensor: holding them keeps the ids unique
        self.tag(device_tensors)
        self.step, self.reads = None, []
        self.sources = _Sources(self)

    def tag(self, tensors) -> None:
        for t in pytree.tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self.on_device[id(t)] = t

    def tagged(self, t) -> bool:
        return id(t) in self.on_device

    def record(self, what: str) -> None:
        self.reads.append((self.step, what))

    def __enter__(self):
        self.sources.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.sources.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(self.tagged(t) for t in inputs)
        boolean_index = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            t.dtype in (torch.bool, torch.uint8) for t in pytree.tree_leaves(args[1]) if isinstance(t, torch.Tensor))
        if on_device and (func.overloadpacket in self.READS or boolean_index):
            self.record(str(func))
        out = func(*args, **kwargs)
        if on_device:
            self.tag(out)
            self.tag([args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(func._schema.arguments)
                      if a.alias_info is not None and a.alias_info.is_write])
        return out


class _Sources(TorchFunctionMode):
    """HostReads' view of the Python calls: factories told a device, .to(device), tolist / numpy / cpu."""

    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("tolist", "numpy", "cpu") and self.reads.tagged(args[0]):
            self.reads.record(name)
        out = func(*args, **kwargs)
        device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None)
                            if name == "to" else None)
        if func is torch.tensor and isinstance(device, torch.device):
            self.reads.record("tensor(data, device)")
        if (func in FACTORIES or name == "to") and isinstance(device, torch.device):
            self.reads.tag(out)
        return out


def trainer_for(command: str, fmnist_dir: Path, device: str = "cpu", precision: str = "fp32",
                noise: tuple[str, ...] = ("--sigma", "0.5")):
    """(trainer, training data) of `command` on preset tiny, 8 steps of 16 images; fine-tuning for `noise`."""
    argv = ["--preset", "tiny", *common(fmnist_dir, "unused")]
    if command == "finetune":
        argv += ["--from-scratch", *noise]
    args = main_args(command, argv)
    env, cfg = DistEnv(device=torch.device(device)), loop.model_config(args)
    data = loop.load_train_data(args, cfg, env.device)
    if command == "finetune":
        if args.sigma is not None:
            args.lam = finetune.default_lam(args.sigma)
        return finetune.Finetuner(cfg, None, data, args, env, precision, layer_decay=1.0), data
    return pretrain.Pretrainer(cfg, data, args, env, precision, steps=8), data


def device_tensors(trainer, data) -> list[torch.Tensor]:
    modules = [p for p in trainer.parts().values() if isinstance(p, torch.nn.Module)]
    return [data.images, data.labels, *(t for m in modules for t in (*m.parameters(), *m.buffers()))]


@pytest.mark.parametrize("command, noise", [("pretrain", ()), ("finetune", ("--sigma", "0.5")),
                                            ("finetune", ("--sigmas", "0.25,0.5,1")), ("finetune", ("--sigma-range", "0.12:1"))])
def test_no_host_reads_of_device_values_between_log_lines(command, noise, fmnist_dir, monkeypatch):
    trainer, data = trainer_for(command, fmnist_dir, noise=noise)
    mode = HostReads(device_tensors(trainer, data))
    step_loss = trainer.step_loss

    def counted(step):
        mode.step = step
        return step_loss(step)

    trainer.step_loss = counted
    settings = loop.LoopSettings(8, 2, 1e-3, 16, 4, 0, len(data), clip=2.0 if command == "pretrain" else None,
                                 time_budget=1e9)
    records = []
    with mode:
        result = loop.run_loop(settings, trainer, 0, lambda step, seconds: None, records.append, DistEnv(), "test")
    assert result.end == 8 and [r["step"] for r in records] == [4, 8]
    assert mode.reads, "the log lines read their means: the detector must see that"
    assert {step for step, _ in mode.reads} <= {3, 7}, mode.reads  # steps 4 and 8 end in a log line


def test_host_read_detector_sees_a_planted_read(fmnist_dir):
    trainer, data = trainer_for("finetune", fmnist_dir)
    mode = HostReads(device_tensors(trainer, data))
    with mode:
        loss, parts = trainer.step_loss(0)
        assert mode.reads == []
        if parts["accuracy"] > 2:  # a hidden read: bool() of a device value
            pass
        parts["ce"].tolist()
    assert [what for _, what in mode.reads] == ["aten._local_scalar_dense.default", "tolist"]


# --- time budget ---------------------------------------------------------------------------------------------

def budget_args(time_budget=None, warmup=None):
    return argparse.Namespace(time_budget=time_budget, warmup=warmup)


def test_plan_fills_the_budget_at_the_measured_throughput_and_a_resume_keeps_it():
    plan, spent = loop.plan_run(budget_args(), None, 40, lambda: pytest.fail("no budget: nothing to measure"))
    assert (plan.steps, plan.warmup, plan.time_budget, spent) == (40, 4, None, 0.0)
    # 10 s, 1 s of it spent measuring 0.1 s steps: 95% of the 9 s left.
    plan, spent = loop.plan_run(budget_args(10.0), None, None, lambda: (0.1, 1.0))
    assert (plan.steps, plan.warmup, plan.seconds_per_step, plan.measure_seconds, spent) == (85, 8, 0.1, 1.0, 1.0)
    assert loop.plan_run(budget_args(10.0, warmup=3), None, 50, lambda: (0.1, 1.0))[0].steps == 50  # --steps: a limit
    assert loop.plan_run(budget_args(10.0), None, None, lambda: (100.0, 11.0))[0].steps == 1  # at least one step
    state = {"plan": dataclasses.asdict(plan), "train_seconds": 6.5}
    assert loop.plan_run(budget_args(10.0), state, None, lambda: pytest.fail("a resume measures nothing")) == (plan, 6.5)
    assert loop.length_recipe(budget_args(10.0), None) == {"steps": None, "warmup": None, "time_budget": 10.0}
    assert loop.length_recipe(budget_args(), 40) == {"steps": 40, "warmup": 4}  # as before budgets existed


class Clock:
    """What train.loop reads as `time`: perf_counter moves only by what a step `spend`s, so that a time budget
    stops a run at the same step on any machine. Steps spend powers of 2 of a second: the sums are exact."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    return clock


class Steps:
    """A stand-in trainer: one parameter, a step that takes `seconds` of `clock`."""

    def __init__(self, seconds: float, clock: Clock):
        self.module = torch.nn.Linear(1, 1)
        self.optimizer = loop.adamw(loop.param_groups(self.module, 0.0), 1e-3)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.seconds, self.clock = seconds, clock

    def step_loss(self, step):
        self.clock.spend(self.seconds)
        return self.module(torch.ones(1)).sum(), {}

    def after_step(self, step):
        return {}

    def parts(self):
        return {"model": self.module, "optimizer": self.optimizer}


def test_loop_stops_at_the_first_log_line_past_the_budget_and_saves_there(clock):
    saved, records = [], []
    settings = loop.LoopSettings(10_000, 0, 1e-3, 4, 3, 0, 40, time_budget=0.3)
    result = loop.run_loop(settings, Steps(1 / 32, clock), 0, lambda step, seconds: saved.append((step, seconds)),
                           records.append, DistEnv(), "test", spent=0.1)
    # 0.1 s spent before, 1/32 s a step: the budget is spent in step 7, a log line every 3 steps stops it at 9.
    assert result.out_of_time and result.end == 9
    assert result.total_seconds == 0.1 + 9 / 32 and saved == [(9, result.total_seconds)]
    assert records[-1]["stopped"] == "time budget" and records[-1]["seconds"] == pytest.approx(0.1 + 9 / 32, abs=0.005)
    assert all("stopped" not in r for r in records[:-1]) and records[-1]["epoch"] == pytest.approx(result.end * 4 / 40)
    assert "stopped by the time budget" in result.summary(settings)
    # Resumed with the budget spent: nothing more.
    again = loop.run_loop(settings, Steps(1 / 32, clock), result.end, lambda *a: pytest.fail("nothing to save"),
                          records.append, DistEnv(), "test", spent=result.total_seconds)
    assert (again.start, again.end, again.out_of_time) == (result.end, result.end, True)
    assert again.summary(settings).startswith("nothing to train")


def test_measuring_the_throughput_leaves_no_trace(fmnist_dir):
    trainer, _ = trainer_for("pretrain", fmnist_dir)
    before = loop.training_state(0, trainer.parts())
    before = {k: copy.deepcopy(v) for k, v in before.items()}
    per_step, spent = loop.measure_step_seconds(trainer, 1e-3, 2.0, DistEnv())
    assert 0 < per_step * loop.MEASURE_STEPS <= spent
    after = loop.training_state(0, trainer.parts())
    for name in ("model", "target"):
        assert all(torch.equal(before[name][k], after[name][k]) for k in before[name])
    assert after["optimizer"]["state"] == {} and torch.equal(before["rng"]["torch"], after["rng"]["torch"])


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_time_budget_run_records_its_plan_and_resumes_exactly(command, fmnist_dir, tmp_path, monkeypatch, capsys):
    extra = six_steps(command, *(["--eval-images", "0"] if command == "finetune" else []))
    budget = [*extra, "--time-budget", "1000"]  # ample: the 6 steps of --steps are the limit
    fixed = tmp_path / "fixed"
    assert main([command, *extra, *common(fmnist_dir, fixed)]) == 0
    straight, resumed = straight_and_killed(command, budget, fmnist_dir, tmp_path, monkeypatch, nth=2)
    printed = capsys.readouterr().out
    assert "6 steps of 16 (the 1000 s budget at" in printed  # the straight run's last line:
    assert any(line.startswith(f"rrcm {command}: steps 1-6 of 6 in ") and "images/s; 1.00 epochs in all" in line
               for line in printed.splitlines())
    # The measuring steps were undone: the same weights as the plain 6-step run.
    assert same_weights(fixed, straight)
    config = rrcm.checkpoint.read_config(straight)
    assert (config["step"], config["steps"], config["time_budget"]) == (6, 6, 1000)
    assert config["epochs"] == pytest.approx(6 * 16 / 96) and config["train_seconds"] > 0 and config["seconds_per_step"] > 0
    assert read_log(straight)[-1]["epoch"] == pytest.approx(1.0)
    state = torch.load(resumed / "train_state.pt", weights_only=True)
    assert state["plan"]["steps"] == 6 and state["train_seconds"] > 0
    with monkeypatch.context() as m:  # a resume keeps the plan: it measures nothing
        m.setattr(loop, "measure_step_seconds", lambda *a: pytest.fail("measured again"))
        assert main([command, *budget, *common(fmnist_dir, resumed)]) == 0
    assert same_weights(straight, resumed)
    capsys.readouterr()
    assert main([command, *extra, "--time-budget", "500", *common(fmnist_dir, resumed)]) == 2
    assert "other settings (time_budget)" in error_line(capsys)


def test_finetune_stopped_by_its_budget_stays_stopped(fmnist_dir, tmp_path, monkeypatch, capsys, clock):
    out = tmp_path / "clf"
    argv = ["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0.5", "--eval-images", "10",
            "--time-budget", "0.5", *common(fmnist_dir, out), "--log-every", "2"]
    original = finetune.Finetuner.step_loss

    def slow(self, step):
        clock.spend(1 / 16)
        return original(self, step)

    with monkeypatch.context() as m:  # a throughput 25x what the steps will make: the budget stops the run
        m.setattr(loop, "measure_step_seconds", lambda *a: (0.0025, 0.0))
        m.setattr(finetune.Finetuner, "step_loss", slow)
        assert main(argv) == 0
    config = rrcm.checkpoint.read_config(out)
    # 190 steps planned (95% of 0.5 s at 2.5 ms); at 1/16 s a step the budget is spent at step 8, a log line.
    assert (config["steps"], config["step"], config["train_seconds"], config["test_images"]) == (190, 8, 0.5, 10)
    assert "stopped by the time budget" in capsys.readouterr().out
    log = read_log(out)
    assert log[-2]["stopped"] == "time budget" and log[-1]["test_images"] == 10
    # The same command again: the budget is spent, nothing is trained or evaluated again.
    assert main(argv) == 0
    assert "nothing to train" in capsys.readouterr().out and read_log(out) == log


def test_a_loss_that_stops_being_a_number_stops_the_run_before_it_is_saved(tmp_path, capsys):
    out = tmp_path / "nan"
    args = ["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0.25", "--lr", "1e30", "--steps", "40",
            "--log-every", "10", "--save-every", "20", "--max-train-images", "512", "--batch-size", "64",
            "--eval-images", "0", "--device", "cpu", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rrcm: error: the training loss is nan by step 10") and "lower --lr" in err
    assert not (out / "model.safetensors").exists() and not (out / "train_state.pt").exists()
