"""Pre-training and fine-tuning: objective pieces, schedules, resume equality, CLI runs and bad input."""
import gzip
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rrcm
from rrcm.cli import main
from rrcm.model import Classifier, Encoder
from rrcm.presets import get_preset
from rrcm.train import finetune, loop, pretrain
from rrcm.train.distributed import DistEnv
from rrcm.train.losses import info_nce

TINY = get_preset("tiny")


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
    data = loop.load_train_data(args, cfg)
    args.lam = finetune.default_lam(args.sigma)
    trainer = finetune.Finetuner(cfg, None, data, args, env, "fp32", steps=4, layer_decay=1.0)
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


def run_killed(monkeypatch, cls, argv: list[str], at_step: int) -> None:
    """Run `argv` but stop it, like a kill, when step `at_step` begins."""
    original = cls.step_loss

    def step_loss(self, step):
        if step == at_step:
            raise Killed
        return original(self, step)

    with monkeypatch.context() as m:
        m.setattr(cls, "step_loss", step_loss)
        assert main(argv) == 130


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_kill_and_resume_gives_identical_weights(command, fmnist_dir, tmp_path, monkeypatch):
    extra = ["--preset", "tiny", "--steps", "6", "--save-every", "2"]
    if command == "finetune":
        extra += ["--from-scratch", "--sigma", "0.5", "--eval-images", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([command, *extra, *common(fmnist_dir, straight)]) == 0
    cls = pretrain.Pretrainer if command == "pretrain" else finetune.Finetuner
    run_killed(monkeypatch, cls, [command, *extra, *common(fmnist_dir, resumed)], at_step=3)
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
    (["pretrain", "--preset", "tiny", "--batch-size", "500"], "larger than the 96 training images"),
    (["pretrain", "--preset", "tiny", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["pretrain", "--preset", "tiny", "--embed-dim", "33"], "embed_dim 33 must be even"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0"], "sigma must be a positive number"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "-0.5"], "sigma must be a positive number"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "nan"], "sigma must be a positive number"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0.5", "--steps", "0"], "--steps must be positive"),
    (["finetune", "--from-scratch", "--preset", "tiny", "--sigma", "0.5", "--layer-decay", "1.5"], "--layer-decay"),
])
def test_bad_input_is_a_one_line_error(argv, message, fmnist_dir, tmp_path, capsys):
    assert main([argv[0], *common(fmnist_dir, tmp_path / "out"), *argv[1:]]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "out" / "config.json").exists()


def test_missing_data_folder(tmp_path, capsys):
    argv = ["pretrain", "--preset", "tiny", *common(tmp_path / "nowhere", tmp_path / "out")]
    assert main(argv) == 2
    assert "nowhere" in error_line(capsys)


def test_init_must_be_an_encoder_checkpoint(encoder_dir, fmnist_dir, tmp_path, capsys):
    base = ["finetune", "--sigma", "0.5", *common(fmnist_dir, tmp_path / "out")]
    assert main([*base, "--init", str(tmp_path)]) == 2
    assert "not a checkpoint folder" in error_line(capsys)
    clf = tmp_path / "clf"
    rrcm.checkpoint.save_checkpoint(clf, Classifier(TINY), TINY, kind="classifier", sigma=0.5)
    assert main([*base, "--init", str(clf)]) == 2
    assert "not a pre-trained encoder" in error_line(capsys)
    assert main([*base, "--init", str(encoder_dir), "--preset", "tiny"]) == 2
    assert "--preset" in error_line(capsys)


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
                       "--save-every", "--seed", "--log-every", "--device", "--data-dir", "--max-train-images"):
            assert option in text
    main(["finetune", "--help"])
    text = capsys.readouterr().out
    for option in ("--init", "--from-scratch", "--sigma", "--lam", "--eta", "--layer-decay", "--epochs", "--eval-images"):
        assert option in text
