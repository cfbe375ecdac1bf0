"""The per-sample cost of diffusion-denoised smoothing over rRCM's, measured through the same engine in one run.

    python benchmarks/dds_ratio.py --device cuda --json dds.json       # ADM-256 + ViT-L/16 at 224 and 512 px vs rrcm-b-imagenet
    python benchmarks/dds_ratio.py --device cpu --tiny --json dds.json # the same code on 32 px models (the CPU rehearsal)

Every model runs through `Certifier` in `rrcm bench`'s "bf16" configuration (bf16 weights, eager, the device's
default sampler, counts on the device) and is timed by `rrcm.engine.throughput.measure`: rRCM as a random-weight
preset, DDS (Carlini et al., 2023; `gpu_models`) as a [-1, 1] model behind `gpu_models.PixelSpace`, in NCHW and
channels_last (the faster layout is the baseline's figure). The ratio is rRCM's samples/s over DDS's; the paper
says 85x, the FLOP ratio is 66.9x at 224 px and 83.9x at 512 px.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

import gpu_models
from rrcm.device import resolve_device
from rrcm.engine import bench, throughput

CONFIG = "bf16"
MODELS = {False: ("rrcm-b-imagenet", ("dds-vit-l16-224", "dds-vit-l16-512")), True: ("tiny", ("dds-tiny",))}
BATCH = {False: {"rrcm": 1000, "dds": 32}, True: {"rrcm": 128, "dds": 4}}  # --tiny: sizes for a CPU


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="rRCM preset tiny against a 32 px DDS pipeline")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model after its warm-up (default 3)")
    p.add_argument("--sigma", type=float, default=0.5, help="noise std in pixel space (default 0.5)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True  # the U-Net's convolutions at their fastest: the baseline at its best
    (rrcm_name, dds_names), batch = MODELS[args.tiny], BATCH[args.tiny]
    result = {"device": throughput.describe_device(device), **throughput.environment(), "config": CONFIG,
              "options": bench.CONFIGS[device.type][CONFIG], "sigma": args.sigma, "models": []}
    classifier, info = throughput.bench_model(rrcm_name, None, args.sigma)
    image = torch.rand(classifier.input_shape, generator=torch.Generator().manual_seed(0))
    rrcm = {**info, **throughput.measure(CONFIG, classifier, image, batch["rrcm"], args.seconds, device)}
    result["models"].append(rrcm)
    print(f"{rrcm_name}: {rrcm['samples_per_s']:,.1f} samples/s", file=sys.stderr, flush=True)
    for name in dds_names:
        parameters, macs = gpu_models.count_macs(name)
        for channels_last in (False, True):
            model, shape = gpu_models.build(name, args.sigma, device=device)
            model = gpu_models.PixelSpace(model.eval(), args.sigma, shape, channels_last=channels_last)
            image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
            timing = throughput.measure(CONFIG, model, image, batch["dds"], args.seconds, device)
            del model
            entry = {"name": name, "layout": "channels_last" if channels_last else "nchw", "parameters": parameters,
                     "flop_per_sample": 2 * macs, **timing, "ratio_to_rrcm": rrcm["samples_per_s"] / timing["samples_per_s"],
                     "ratio_by_flop": 2 * macs / rrcm["flop_per_sample"]}
            result["models"].append(entry)
            print(f"{name} {entry['layout']}: {timing['samples_per_s']:,.2f} samples/s, {entry['ratio_to_rrcm']:.1f}x "
                  f"rRCM's cost per sample (by FLOP {entry['ratio_by_flop']:.1f}x)", file=sys.stderr, flush=True)
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
    best = {}
    for m in result["models"][1:]:  # per DDS model, its faster layout
        if m["name"] not in best or m["ratio_to_rrcm"] < best[m["name"]]["ratio_to_rrcm"]:
            best[m["name"]] = m
    result["ratio_to_rrcm"] = {name: m["ratio_to_rrcm"] for name, m in best.items()}
    print(f"| DDS model ({CONFIG}, faster layout) | samples/s | rRCM ({rrcm_name}) samples/s | measured ratio | FLOP ratio |")
    print("|---|---|---|---|---|")
    for name, m in best.items():
        print(f"| {name} ({m['layout']}) | {m['samples_per_s']:,.2f} | {rrcm['samples_per_s']:,.0f} | "
              f"{m['ratio_to_rrcm']:.1f}x | {m['ratio_by_flop']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
