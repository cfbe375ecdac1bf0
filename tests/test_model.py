"""The network, presets, schedule and the load_classifier contract."""
import math

import pytest
import torch

from rrcm import load_classifier
from rrcm.checkpoint import load_public_state_dict, read_state_dict, save_checkpoint
from rrcm.classifier import NoisyImageClassifier
from rrcm.cli import main
from rrcm.errors import UserError
from rrcm.model import Classifier, Encoder, parameter_counts
from rrcm.presets import PRESETS, get_preset
from rrcm.schedule import (
    c_in, grid_time_for_sigma, karras_times, nearest_time, num_scales, target_ema, time_embedding, time_for_sigma,
)


def public_keys(depth: int, mlp_time_embed: bool = False) -> set[str]:
    """Parameter and buffer names of the paper's rRCMViT, written out from its published layout."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    if mlp_time_embed:
        keys |= {"time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias"}
    for i in range(depth):
        keys |= {f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    keys |= {"projection_head.0.weight", "projection_head.3.weight", "projection_head.6.weight"}
    for bn in (1, 4):
        keys |= {f"projection_head.{bn}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    return keys


@pytest.mark.parametrize("name,part,millions", [
    ("rrcm-b-imagenet", "encoder", 85.8), ("rrcm-b-imagenet", "projector", 21.0), ("rrcm-s-imagenet", "encoder", 19.4),
])
def test_paper_parameter_counts(name, part, millions):
    assert round(parameter_counts(PRESETS[name])[part] / 1e6, 1) == millions


@pytest.mark.parametrize("mlp_time_embed", [False, True])
def test_public_names(mlp_time_embed):
    cfg = get_preset("tiny", mlp_time_embed=mlp_time_embed)
    assert set(Encoder(cfg).state_dict()) == public_keys(cfg.depth, mlp_time_embed)
    finetuned = {f"base_model.{k}" for k in public_keys(cfg.depth, mlp_time_embed)} | {"linear_head.weight", "linear_head.bias"}
    # A fine-tuned public checkpoint carries the pre-training projector; it loads strictly, projector dropped.
    state = {k: v for k, v in Encoder(cfg).state_dict().items()}
    state = {f"module.base_model.{k}": v for k, v in state.items()}
    state |= {"module.linear_head.weight": torch.randn(10, cfg.embed_dim), "module.linear_head.bias": torch.randn(10)}
    assert {k.removeprefix("module.") for k in state} == finetuned
    clf = Classifier(cfg)
    load_public_state_dict(clf, state)
    assert torch.equal(clf.linear_head.bias, state["module.linear_head.bias"])
    with pytest.raises(UserError, match="missing linear_head.bias"):
        load_public_state_dict(clf, {k: v for k, v in state.items() if k != "module.linear_head.bias"})
    with pytest.raises(UserError, match="unexpected extra"):
        load_public_state_dict(clf, state | {"extra": torch.zeros(1)})


def test_shapes_and_time_token():
    cfg = get_preset("tiny")
    enc = Encoder(cfg).eval()
    x = torch.randn(5, 1, 28, 28)
    t = torch.full((5,), 0.5)
    z, h = enc(x, t)
    assert z.shape == (5, cfg.proj_dim) and h.shape == (5, cfg.embed_dim)
    # The time token changes the representation.
    assert not torch.allclose(enc.features(x, t), enc.features(x, torch.full((5,), 2.0)))
    assert Classifier(cfg)(x, t).shape == (5, 10)


def test_schedule_values():
    grid = karras_times(81)
    assert grid[0] == pytest.approx(80.0) and grid[-1] == pytest.approx(0.002) and bool((grid[:-1] > grid[1:]).all())
    assert [round(grid_time_for_sigma(s), 4) for s in (0.25, 0.5, 1.0)] == [0.4927, 0.9654, 2.0036]
    assert nearest_time(1.0) == pytest.approx(0.9654, abs=1e-4)
    assert time_for_sigma(0.25) == 0.5
    assert c_in(0.0) == pytest.approx(2.0) and c_in(torch.tensor(0.5)).item() == pytest.approx(1 / math.sqrt(0.5))
    # N(k): 21 at the start, 81 at the end; K' = ceil(1000 / log2(5)) = 431.
    assert [num_scales(k, 1000) for k in (0, 1, 431, 432, 862, 863, 1000)] == [21, 41, 41, 81, 81, 81, 81]
    assert target_ema(0, 100) == pytest.approx(0.99) and target_ema(100, 100) == pytest.approx(0.9999)
    emb = time_embedding(torch.tensor([1.0]), 8)  # tau(1) = 0: cos half ones, sin half zeros
    assert torch.equal(emb, torch.tensor([[1.0] * 4 + [0.0] * 4]))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserError):
            time_for_sigma(bad)


@pytest.fixture
def checkpoint(tmp_path):
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    clf = Classifier(cfg)
    torch.nn.init.normal_(clf.linear_head.weight)
    return save_checkpoint(tmp_path / "clf", clf, cfg, kind="classifier", sigma=0.25, dataset="fashion-mnist"), clf


def test_load_classifier_contract(checkpoint):
    folder, clf = checkpoint
    model = load_classifier(folder)
    assert isinstance(model, NoisyImageClassifier) and not model.training and model.sigma == 0.25
    x = torch.rand(4, 1, 28, 28)
    t = grid_time_for_sigma(0.25)
    expected = clf.eval()((x - 0.5) / 0.5, torch.full((4,), t))  # pixel -> model space inside
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="fine-tuned for sigma 0.25, not 0.5"):
        load_classifier(folder, sigma=0.5)


def test_bad_checkpoints(tmp_path, checkpoint):
    folder, _ = checkpoint
    with pytest.raises(UserError, match="no such checkpoint"):
        load_classifier(tmp_path / "missing")
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="unreadable or unsafe"):
        load_classifier(folder)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(UserError, match="corrupt config"):
        load_classifier(folder)
    with pytest.raises(UserError, match="bundled model 'fashion-mnist' has a classifier for each of sigma 0.25, 0.5, 1"):
        load_classifier("fashion-mnist", sigma=0.3)


def test_pickle_is_never_executed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(UserError, match="unreadable or unsafe|not a zip archive"):
        read_state_dict(path)


def test_info_cli(capsys):
    assert main(["info", "rrcm-b-imagenet"]) == 0
    out = capsys.readouterr().out
    assert "85.8M" in out and "21.0M" in out
    assert main(["info", "no-such-preset"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rrcm: error: unknown preset 'no-such-preset'; choose from " + ", ".join(PRESETS)]
