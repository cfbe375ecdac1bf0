"""Checkpoints of the paper's code compute in rrcm what they computed there (issue 18, section 3).

The reference below is the official fine-tuned forward written out from its published code
(rrcm_tune.py `reload_forward` / `FinetuneModel`, certify.py `BaseModel`, the Karras denoiser and
the 'icm' scales function), on the raw state dict, with plain tensor ops: nothing of rrcm.model.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from rrcm.checkpoint import load_public_checkpoint, read_config, save_checkpoint
from rrcm.classifier import NoisyImageClassifier, load_classifier
from rrcm.cli import build_parser
from rrcm.data import TensorImageDataset
from rrcm.distributed import DistEnv
from rrcm.errors import UserError
from rrcm.model import Classifier, Encoder
from rrcm.presets import PRESETS, ModelConfig
from rrcm.schedule import grid_time_for_sigma
from rrcm.train import finetune

CFG = ModelConfig(image_size=16, in_chans=3, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                  proj_hidden=48, proj_dim=16, num_classes=10, dataset="cifar10")
SIGMAS = (0.25, 0.5, 1.0)


# --- the official forward -----------------------------------------------------------------------------

def official_num_scales(step: int, total_steps: int = 600_000, start: int = 20, end: int = 80) -> int:
    """ema_and_scales_fn's icm_scale (the paper's fine-tuning and certification configs: 600k steps)."""
    k_prime = math.ceil(total_steps / math.log2(math.ceil(end / start) + 1))
    return int(min(start * 2 ** math.ceil(step / k_prime), end) + 1)


def official_time(sigma: float, num_scales: int, rho: float = 7.0) -> torch.Tensor:
    """BaseModel.forward: find_nearest(2 sigma) on the float32 grid, then get_sigma(idx) in float32."""
    hi, lo = 80.0 ** (1 / rho), 0.002 ** (1 / rho)
    grid = torch.tensor([hi + i / (num_scales - 1) * (lo - hi) for i in range(num_scales)]) ** rho
    idx = (torch.tensor([2 * sigma]) - grid).abs().argmin()
    return (hi + idx / (num_scales - 1) * (lo - hi)) ** rho


def layer_norm(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def official_logits(state: dict, x_noisy: torch.Tensor, sigma: float, num_scales: int, layernorm: bool,
                    heads: int = CFG.num_heads, patch: int = CFG.patch_size) -> torch.Tensor:
    """Logits of the official fine-tuned model for noisy pixel-space images (core.py normalizes after noising)."""
    s = {k.removeprefix("module.").removeprefix("base_model."): v for k, v in state.items()}
    t = official_time(sigma, num_scales)
    x = (x_noisy - 0.5) / 0.5
    x = x / (t**2 + 0.5**2) ** 0.5  # c_in of get_scalings_for_boundary_condition
    tau = 1000 * 0.25 * torch.log(t + 1e-44)  # rescale_t
    D = s["cls_token"].shape[-1]
    freqs = torch.exp(-math.log(10000) * torch.arange(D // 2, dtype=torch.float32) / (D // 2))
    time_token = torch.cat([torch.cos(tau * freqs), torch.sin(tau * freqs)])  # time_embed is Identity
    patches = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    B, L, _ = patches.shape
    h = torch.cat([s["cls_token"].expand(B, -1, -1), time_token.expand(B, 1, D), patches], 1) + s["pos_embed"]
    for i in range(sum(k.endswith(".attn.qkv.weight") for k in s)):
        b = f"blocks.{i}"
        qkv = layer_norm(h, s, f"{b}.norm1") @ s[f"{b}.attn.qkv.weight"].T
        q, k, v = qkv.reshape(B, L + 2, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 'B L (K H D) -> K B H L D'
        attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
        h = h + (attn @ v).transpose(1, 2).reshape(B, L + 2, D) @ s[f"{b}.attn.proj.weight"].T + s[f"{b}.attn.proj.bias"]
        m = F.gelu(layer_norm(h, s, f"{b}.norm2") @ s[f"{b}.mlp.fc1.weight"].T + s[f"{b}.mlp.fc1.bias"])
        h = h + m @ s[f"{b}.mlp.fc2.weight"].T + s[f"{b}.mlp.fc2.bias"]
    cls = h[:, 0]
    if layernorm:
        cls = layer_norm(cls, s, "norm")
    return cls @ s["linear_head.weight"].T + s["linear_head.bias"]


def official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A fine-tuned state dict as the official code saves it (DDP `module.`, the pre-training projector kept),
    with weights large enough that the final norm, and the time, change the logits."""
    g = torch.Generator().manual_seed(seed)
    names = {f"base_model.{k}": v for k, v in Encoder(CFG).state_dict().items()}
    names |= {"linear_head.weight": torch.empty(CFG.num_classes, CFG.embed_dim),
              "linear_head.bias": torch.empty(CFG.num_classes)}
    state = {}
    for k, v in names.items():
        if k.endswith("num_batches_tracked"):
            state[f"module.{k}"] = v.clone()
        elif k.endswith("running_var"):
            state[f"module.{k}"] = torch.rand(v.shape, generator=g) + 0.5
        else:
            std = 0.2 if k.endswith(("qkv.weight", "fc1.weight", "fc2.weight", "proj.weight")) else 0.5
            state[f"module.{k}"] = torch.randn(v.shape, generator=g) * std + (1.0 if k.endswith("norm.weight") else 0.0)
    return state


def noisy_images(sigma: float, n: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *CFG.input_shape, generator=g)
    return x + sigma * torch.randn(x.shape, generator=g)


# --- the tests --------------------------------------------------------------------------------------

def test_reference_schedule_matches_the_issue():
    """The reference's grid sizes: 41 points at step 100,000, 81 only from about step 258,000 on."""
    assert [official_num_scales(k) for k in (0, 100_000, 258_406, 258_407, 300_000, 600_000)] == [21, 41, 41, 81, 81, 81]
    for sigma in SIGMAS:
        for n in (41, 81):
            assert official_time(sigma, n).item() == pytest.approx(grid_time_for_sigma(sigma, n), rel=1e-6)
    # The 41 grid is every other point of the 81 one: sigma 0.25 is where the two conditionings differ.
    assert [grid_time_for_sigma(s, 41) == grid_time_for_sigma(s, 81) for s in SIGMAS] == [False, True, True]


@pytest.mark.parametrize("final_norm", [True, False])
@pytest.mark.parametrize("pretrain_step", [100_000, 300_000])
def test_official_conventions_give_the_official_logits(final_norm, pretrain_step):
    state = official_state()
    model = load_public_checkpoint(state, CFG, final_norm=final_norm, pretrain_step=pretrain_step)
    num_scales = official_num_scales(pretrain_step)
    assert isinstance(model, Classifier) and model.cfg.final_norm is final_norm and model.cfg.grid_points == num_scales
    for sigma in SIGMAS:
        x = noisy_images(sigma)
        expected = official_logits(state, x, sigma, num_scales, layernorm=final_norm)
        with torch.no_grad():
            torch.testing.assert_close(NoisyImageClassifier(model, sigma)(x), expected, rtol=1e-4, atol=1e-4)
            # The other convention computes something else (where it conditions on another time): the check can fail.
            others = [dict(final_norm=not final_norm)]
            other_grid = {41: 81, 81: 41}[num_scales]
            if grid_time_for_sigma(sigma, other_grid) != grid_time_for_sigma(sigma, num_scales):
                others.append(dict(grid_points=other_grid))
            for other in others:
                wrong = load_public_checkpoint(state, ModelConfig(**{**model.cfg.to_dict(), **other}))
                assert (NoisyImageClassifier(wrong, sigma)(x) - expected).abs().max() > 1e-2, other


def test_conventions_are_recorded_in_checkpoints(tmp_path):
    state = official_state()
    model = load_public_checkpoint(state, CFG, final_norm=False, pretrain_step=100_000)
    folder = save_checkpoint(tmp_path / "paper", model, model.cfg, kind="classifier", sigma=0.5)
    recorded = read_config(folder)["model"]
    assert recorded.final_norm is False and recorded.grid_points == 41
    x = noisy_images(0.5)
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(folder)(x), official_logits(state, x, 0.5, 41, layernorm=False),
                                   rtol=1e-4, atol=1e-4)


def test_config_without_the_keys_keeps_the_old_behaviour(tmp_path):
    """config.json files written before these keys existed (the bundled weights among them): norm on, 81 points."""
    import json

    model = load_public_checkpoint(official_state(), CFG)
    folder = save_checkpoint(tmp_path / "old", model, model.cfg, kind="classifier", sigma=0.25)
    config = json.loads((folder / "config.json").read_text())
    del config["model"]["final_norm"], config["model"]["grid_points"]
    (folder / "config.json").write_text(json.dumps(config))
    cfg = read_config(folder)["model"]
    assert cfg.final_norm is True and cfg.grid_points == 81
    assert load_classifier(folder).t == grid_time_for_sigma(0.25, 81)


def test_presets_follow_the_paper_configs():
    assert PRESETS["rrcm-b-cifar"].final_norm is False
    assert PRESETS["rrcm-b-imagenet"].final_norm and PRESETS["rrcm-s-imagenet"].final_norm
    assert all(PRESETS[n].final_norm for n in ("fmnist-xs", "fmnist-s", "fmnist-b", "tiny"))
    assert {cfg.grid_points for cfg in PRESETS.values()} == {81}


def test_loader_defaults_and_bad_arguments(tmp_path):
    state = official_state()
    cifar_sized = ModelConfig(**{**CFG.to_dict(), "final_norm": False})
    assert load_public_checkpoint(state, cifar_sized).cfg.final_norm is False  # the preset's default
    assert load_public_checkpoint(state, CFG).cfg.grid_points == 81
    path = tmp_path / "n05.pt"
    torch.save(state, path)
    assert torch.equal(load_public_checkpoint(path, CFG).linear_head.bias, state["module.linear_head.bias"])
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="pretrain_step"):
            load_public_checkpoint(state, CFG, pretrain_step=bad)
    with pytest.raises(UserError, match="final_norm must be true or false"):
        load_public_checkpoint(state, CFG, final_norm="no")
    with pytest.raises(UserError, match="n05.pt: .*size mismatch"):
        load_public_checkpoint(path, ModelConfig(**{**CFG.to_dict(), "num_classes": 1000}))


def test_unused_final_norm_is_frozen_so_every_trainable_parameter_gets_a_gradient():
    """With the norm off its parameters take no part: frozen, so DDP (no find_unused_parameters) does not fail."""
    model = Classifier(ModelConfig(**{**CFG.to_dict(), "final_norm": False}))
    model(torch.randn(2, *CFG.input_shape), torch.full((2,), 1.0)).sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.norm.weight" not in trainable and all(p.grad is not None for p in trainable.values())


def test_finetuning_a_public_encoder_conditions_on_its_grid(tmp_path, monkeypatch):
    """A public pre-trained encoder (step 100,000: 41 points) fine-tunes and evaluates at its grid's time
    (sigma 0.25: where the 41 and 81 grids differ)."""
    encoder_state = {f"module.{k}": v for k, v in Encoder(CFG).state_dict().items()}
    encoder = load_public_checkpoint(encoder_state, CFG, pretrain_step=100_000)
    assert isinstance(encoder, Encoder)
    init = save_checkpoint(tmp_path / "enc", encoder, encoder.cfg, kind="encoder", dataset="cifar10")
    argv = ["finetune", "--init", str(init), "--sigma", "0.25", "--out", str(tmp_path / "o")]
    args = build_parser("finetune").parse_args(argv)
    args.lam = finetune.default_lam(args.sigma)
    cfg = finetune.encoder_config(str(init))
    data = TensorImageDataset("cifar10", 10, torch.zeros(4, *CFG.input_shape, dtype=torch.uint8), torch.arange(4))
    trainer = finetune.Finetuner(cfg, init, data, args, DistEnv(), "fp32", layer_decay=0.65)
    assert trainer.levels.t_cond == grid_time_for_sigma(0.25, 41) != grid_time_for_sigma(0.25, 81)
    seen = []
    monkeypatch.setattr(finetune.loop, "full_time", lambda t, n, device: seen.append(t) or torch.full((n,), float(t)))
    finetune.noisy_accuracy(trainer.model, data, 0.25, 4, 4, 0, DistEnv())
    assert seen == [grid_time_for_sigma(0.25, 41)]
