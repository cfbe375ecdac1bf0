"""`rrcm certify` and `rrcm predict`: a model and a test set in, Cohen et al.'s TSV out."""
from __future__ import annotations

import argparse
import datetime
import hashlib
from pathlib import Path

import torch

from rrcm.errors import UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_model(spec: str, sigma: float | None, device: torch.device):
    """(model, fingerprint): an exported file (.onnx, .pt2, .plan) as is, or a checkpoint folder / bundled name through load_classifier."""
    from rrcm.checkpoint import CONFIG, WEIGHTS
    from rrcm.classifier import load_classifier, resolve_checkpoint

    path = Path(spec)
    if path.is_file() or path.suffix == ".onnx":
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        return str(path), _sha256([path])
    model = load_classifier(spec, sigma, device=device)
    folder = resolve_checkpoint(spec, sigma)
    return model, _sha256([folder / WEIGHTS, folder / CONFIG])


class _Command:
    def __init__(self, mode: str, help: str):
        self.mode, self.help = mode, help

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.epilog = (f"Sharded over K processes: torchrun --nproc-per-node K -m rrcm -- {self.mode} ... "
                    "(the '--' stops torchrun from reading --n and --max as its own options).")
        p.add_argument("--model", required=True,
                       help="fine-tuned checkpoint folder, bundled model name (fashion-mnist), or an exported file: "
                            ".onnx, .pt2 (AOTInductor) or .plan (TensorRT) from 'rrcm export'")
        p.add_argument("--sigma", type=float, default=None,
                       help="noise std in pixel space (images in [0, 1]); default: the one the model records")
        p.add_argument("--dataset", default=None,
                       help="test set: fashion-mnist, cifar10 or imagenet (default: the one the model was trained on)")
        p.add_argument("--data-dir", default=None, help="folder of the dataset (default: its standard location)")
        if self.mode == "certify":
            p.add_argument("--n0", type=int, default=100, help="selection samples per image (default 100)")
            p.add_argument("--radius", type=float, default=None,
                           help="decide robustness at this L2 radius r with as few samples as possible (anytime-valid "
                                "sequential test, --n the budget); TSV: idx label predict certified samples time")
            p.add_argument("--beta", type=float, default=None,
                           help="--radius: chance of giving up early on an image that is robust at r (default 0.001; "
                                "0: never give up before the budget)")
            p.add_argument("--adaptive", action="store_true",
                           help="the largest radius within a budget of --n samples, stopping early at doubling "
                                "checkpoints; TSV gets a samples column after correct")
            p.add_argument("--tolerance", type=float, default=None,
                           help="--adaptive: stop once more samples would raise the radius by at most this (default 0.01)")
        p.add_argument("--n", type=int, default=100_000,
                       help="estimation samples per image (default 100000; the budget with --radius or --adaptive)")
        p.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate (default 0.001)")
        p.add_argument("--batch", type=int, default=None,
                       help="noisy samples per forward pass (default: 1000 on GPU, 128 on CPU, where a smaller batch's "
                            "activations stay in cache); images share a batch when n is smaller")
        p.add_argument("--skip", type=int, default=1, help="take every K-th test image: idx 0, K, 2K, ... (default 1)")
        p.add_argument("--max", type=int, default=None, help="stop after M images (a count, not an index; default all)")
        p.add_argument("--seed", type=int, default=0,
                       help="noise seed; image idx draws from seed (seed, idx), so reruns and shards agree (default 0)")
        p.add_argument("--backend", default=None,
                       help="torch, onnxruntime, aoti or tensorrt (default: by the file's suffix, torch for a checkpoint; "
                            "onnxruntime exports a checkpoint on the fly)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--compile", action="store_true", help="torch backend: run the model through torch.compile")
        p.add_argument("--sound", action="store_true",
                       help="sound sampling: noise rounded to the 1/255 grid of 8-bit images (Voracek & Hein, 2023), "
                            "no floating-point holes in the certificate; off-grid images are refused")
        p.add_argument("--precision", default="fp32",
                       help="torch backend: fp32, bf16, or int8 (x86 CPUs, needs torchao: static quantization calibrated "
                            "on 512 noisy training images); the certificate is for the classifier at that precision "
                            "(default fp32)")
        p.add_argument("--out", required=True,
                       help="TSV to write (idx label predict [radius] correct time, or as the modes above say); rerun to resume")

    def run(self, args: argparse.Namespace) -> int:
        from rrcm.data import load_dataset
        from rrcm.engine import runner
        from rrcm.engine.backends import make_backend
        from rrcm.engine.certifier import Certifier
        from rrcm.train.distributed import setup, teardown

        certify = self.mode == "certify"
        if certify and args.tolerance is not None and not args.adaptive:
            raise UserError("--tolerance applies to --adaptive only")
        if certify and args.beta is not None and args.radius is None:
            raise UserError("--beta applies to --radius only")
        variants = {"radius": args.radius, "adaptive": args.adaptive} if certify else {}
        if certify and args.tolerance is not None:
            variants["tolerance"] = args.tolerance
        if certify and args.beta is not None:
            variants["beta"] = args.beta
        job = runner.Job(self.mode, args.n, args.alpha, args.n0 if certify else 100,
                         args.skip, args.max, args.seed, **variants).check()
        if args.precision not in PRECISIONS:
            raise UserError(f"unknown precision {args.precision!r}; choose from {', '.join(PRECISIONS)}")
        options = {}
        if args.compile or args.precision != "fp32":
            if args.backend not in (None, "torch") or Path(args.model).suffix in (".onnx", ".pt2", ".plan"):
                raise UserError("--compile and --precision apply to the torch backend only")
            options = {"compile": args.compile, "dtype": PRECISIONS[args.precision]}
        # Processes wait at the final barrier for the slowest shard: allow for long runs.
        env = setup(args.device, timeout=datetime.timedelta(days=7))
        rank, world, device = env.rank, env.world_size, env.device
        finished = False
        try:
            model, fingerprint = load_model(args.model, args.sigma, device)
            batch = args.batch if args.batch is not None else (1000 if device.type == "cuda" else 128)
            if args.precision == "int8":
                from rrcm.engine.quantize import dataset_calibration

                train = load_dataset(args.dataset or model.cfg.dataset, "train", args.data_dir)
                options.update(calibration=dataset_calibration(train, model.sigma), static_batch=batch)
            backend = make_backend(model, device, args.backend, **options)
            info = backend.info
            sigma = args.sigma if args.sigma is not None else info.sigma
            if sigma is None:
                raise UserError(f"{args.model} records no sigma: give --sigma")
            dataset_name = args.dataset or info.dataset  # checkpoint config or ONNX metadata
            if dataset_name is None:
                raise UserError(f"{args.model} records no dataset: give --dataset")
            dataset = load_dataset(dataset_name, "test", args.data_dir)
            if info.num_classes is not None and info.num_classes != dataset.num_classes:
                raise UserError(f"{args.model} has {info.num_classes} classes, {dataset_name} has {dataset.num_classes}")
            certifier = Certifier(model, dataset.num_classes, sigma, batch_size=batch, backend=backend, sound=args.sound)
            if certifier.input_shape is None:
                certifier.check_input(dataset.input_shape, args.model)
            if certifier.input_shape != tuple(dataset.input_shape):
                raise UserError(f"{args.model} takes inputs of shape {certifier.input_shape}, "
                                f"{dataset_name} images are {tuple(dataset.input_shape)}")
            params = {"model": args.model, "model_sha256": fingerprint, "sigma": sigma, "dataset": dataset_name,
                      "data_dir": args.data_dir, "batch": batch, "backend": backend.name, "device": str(device),
                      "precision": args.precision, "compile": args.compile}
            if args.sound:  # recorded only when set, so that older sidecars still resume
                params["sound"] = True
            out = runner.run(certifier, dataset, args.out, job, params, rank=rank, world=world)
            if rank == 0:
                print(f"{out}: {job.mode} of {len(job.indices(len(dataset)))} {dataset_name} test images at sigma {sigma:g} done")
            finished = True
        finally:
            teardown(finished)
        return 0


CERTIFY = _Command("certify", "certify test images (Cohen et al.'s CERTIFY), one TSV row each")
PREDICT = _Command("predict", "smoothed predictions with abstention (Cohen et al.'s PREDICT), one TSV row each")
