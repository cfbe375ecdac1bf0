"""`rrcm certify` and `rrcm predict`: a model and a test set in, Cohen et al.'s TSV out."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rrcm.errors import UserError

if TYPE_CHECKING:  # torch is imported when a command runs, not for --help
    import torch

    from rrcm.engine.autoselect import Choice

PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8")  # their dtypes: rrcm.engine.backends.PRECISIONS


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_model(spec: str, sigma: float | None, device: torch.device, backend: str | None = None):
    """(model, fingerprint): an exported file (.onnx, .pt2, .plan) as is, or a checkpoint folder / bundled name
    through load_classifier. A file of another suffix runs only with an explicit `backend`."""
    from rrcm.checkpoint import CONFIG, WEIGHTS
    from rrcm.classifier import load_classifier, resolve_checkpoint
    from rrcm.engine.backends import SUFFIXES

    path = Path(spec)
    if path.is_file() or path.suffix in SUFFIXES:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        if path.suffix not in SUFFIXES and backend is None:
            raise UserError(f"{path}: not a model file rrcm runs ({', '.join(SUFFIXES)} from 'rrcm export'); give a "
                            f"checkpoint folder or a bundled model name, or --backend for a file named otherwise")
        return str(path), _sha256([path])
    model = load_classifier(spec, sigma, device=device)
    folder = resolve_checkpoint(spec, sigma)
    return model, _sha256([folder / WEIGHTS, folder / CONFIG])


MIN_AGREEMENT = 0.995  # on CUDA, a lower precision that gives the float32 top class less often is refused


def precision_agreement(model, backend, inputs, precision: str, batch: int, verbose: bool = True) -> float:
    """How often `backend` (a lower precision) gives the float32 classifier's top class on noisy `inputs`; on CUDA,
    below MIN_AGREEMENT is refused: that precision would certify a classifier too far from the one trained."""
    from rrcm.export.runtime import backend_agreement

    agreement = backend_agreement(model, backend, inputs=inputs, batch=batch).argmax_agreement
    if verbose:
        print(f"rrcm: {precision} gives the float32 classifier's top class on {agreement:.2%} of {len(inputs)} noisy "
              f"training images", flush=True)
    if backend.device.type == "cuda" and agreement < MIN_AGREEMENT:
        raise UserError(f"{precision} agrees with float32 on only {agreement:.2%} of noisy training images (at least "
                        f"{MIN_AGREEMENT:.1%} needed on a GPU); use bf16 or fp32")
    return agreement


class _Command:
    def __init__(self, mode: str, help: str):
        self.mode, self.help = mode, help

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.epilog = (f"Sharded over K processes: torchrun --nproc-per-node K -m rrcm -- {self.mode} ... "
                    "(the '--' stops torchrun from reading --n and --max as its own options).")
        p.add_argument("--model", required=True,
                       help="fine-tuned checkpoint folder, bundled model name (fashion-mnist), or an exported file: "
                            ".onnx, .pt2 (AOTInductor) or .plan (TensorRT) from 'rrcm export'; several, comma-separated, "
                            "one per --sigma")
        p.add_argument("--sigma", default=None,
                       help="noise std in pixel space (images in [0, 1]); default: the one the model records. Several, "
                            "comma-separated (e.g. 0.25,0.5,1.0): cascaded smoothing, from the largest sigma down, each "
                            "stage answering where one class has probability above --p0 and otherwise passing the image on; "
                            f"{'certified as that rule, n0' if self.mode == 'certify' else '100 selection samples'} and n "
                            "per stage, alpha / K each; TSV gets samples and sigma (the stage that answered) columns")
        p.add_argument("--p0", type=float, default=None,
                       help="several sigmas: a stage answers when its top class has smoothed probability above this "
                            "(in [0.5, 1); default 0.5)")
        p.add_argument("--dataset", default=None,
                       help="test set: fashion-mnist, cifar10 or imagenet (default: the one the model was trained on)")
        p.add_argument("--data-dir", default=None, help="folder of the dataset (default: its standard location)")
        if self.mode == "certify":
            p.add_argument("--n0", type=int, default=100, help="selection samples per image (default 100)")
            p.add_argument("--radius", type=float, default=None,
                           help="decide robustness at this L2 radius r with as few samples as possible (anytime-valid "
                                "sequential test, --n the budget); TSV: idx label predict certified samples time")
            p.add_argument("--adaptive", action="store_true",
                           help="the largest radius within a budget of --n samples, stopping early at doubling "
                                "checkpoints; TSV gets a samples column after correct")
            p.add_argument("--tolerance", type=float, default=None,
                           help="--adaptive: stop once more samples would raise the radius by at most this (default 0.01)")
        p.add_argument("--n", type=int, default=100_000,
                       help="estimation samples per image (default 100000; the budget with --radius or --adaptive)")
        p.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate (default 0.001)")
        p.add_argument("--beta", type=float, default=None,
                       help="chance of giving up early (abstaining, never a wrong certificate) on an image that "
                            f"{'is robust at --radius r, or ' if self.mode == 'certify' else ''}a stage of several sigmas "
                            "would answer (default 0.001; 0: never before the budget)")
        p.add_argument("--batch", type=int, default=None,
                       help="noisy samples per forward pass (default: 1000 on GPU, 128 on CPU, where a smaller batch's "
                            "activations stay in cache); images share a batch when n is smaller")
        p.add_argument("--skip", type=int, default=1, help="take every K-th test image: idx 0, K, 2K, ... (default 1)")
        p.add_argument("--max", type=int, default=None, help="stop after M images (a count, not an index; default all)")
        p.add_argument("--seed", type=int, default=0,
                       help="noise seed; image idx draws from seed (seed, idx), so reruns and shards agree (default 0)")
        p.add_argument("--force", action="store_true",
                       help="run even when the estimate (images x samples per image at the rate measured here, printed "
                            "before the first image) exceeds 100 days; without it such a run is refused")
        p.add_argument("--backend", default=None,
                       help="torch, onnxruntime, aoti or tensorrt (default: by the file's suffix; for a checkpoint the one "
                            "--precision auto picks, else torch; onnxruntime exports a checkpoint on the fly)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--compile", action="store_true", help="torch backend: run the model through torch.compile")
        p.add_argument("--sound", action="store_true",
                       help="sound sampling: noise rounded to the 1/255 grid of 8-bit images (Voracek & Hein, 2023), "
                            "no floating-point holes in the certificate; off-grid images are refused")
        p.add_argument("--sampler", choices=("torch", "triton"), default=None,
                       help="noise sampler: triton (one fused kernel per batch; the default on CUDA when triton is "
                            "installed) or torch (torch ops; the default on CPU, and the only one for --sound)")
        p.add_argument("--cuda-graphs", action="store_true",
                       help="CUDA, triton sampler, torch backend: capture sampler, model and counting of a full batch once "
                            "as a CUDA graph and replay it (the last batch of an image padded, its padding never counted)")
        p.add_argument("--precision", default="auto",
                       help="auto (default): the classifier's own precision, fp32, on the fastest runtime this CPU offers "
                            "for it (torch eager, torch.compile or ONNX Runtime), timed once per model and machine and "
                            "cached (a checkpoint without --backend or --compile; otherwise, and on a GPU, plain fp32). "
                            "fp32, bf16, fp16 or fp8 (CUDA, compute capability >= 8.9), or int8 (x86 CPUs, needs torchao: "
                            "static quantization calibrated on 512 noisy training images) run the torch backend; the "
                            "certificate is for the classifier at that precision, whose agreement with float32 is measured "
                            "first on 512 other noisy training images (refused below 99.5%% on a GPU)")
        p.add_argument("--out", required=True,
                       help="TSV to write (idx label predict [radius] correct time, or as the modes above say); rerun to resume")

    def run(self, args: argparse.Namespace) -> int:
        from rrcm.data import load_dataset
        from rrcm.distributed import setup, teardown
        from rrcm.engine import runner
        from rrcm.engine.timing import Meter
        from rrcm.outputs import check_writable

        certify = self.mode == "certify"
        if certify and args.tolerance is not None and not args.adaptive:
            raise UserError("--tolerance applies to --adaptive only")
        pairs = model_sigma_pairs(args.model, args.sigma)
        if args.beta is not None and len(pairs) == 1 and (not certify or args.radius is None):
            raise UserError("--beta applies to --radius and to several sigmas only")
        variants = {"radius": args.radius, "adaptive": args.adaptive} if certify else {}
        if certify and args.tolerance is not None:
            variants["tolerance"] = args.tolerance
        if args.beta is not None:
            variants["beta"] = args.beta
        if args.p0 is not None:
            if len(pairs) < 2:
                raise UserError("--p0 applies to several sigmas (a cascade) only")
            variants["p0"] = args.p0
        job = runner.Job(self.mode, args.n, args.alpha, args.n0 if certify else 100,
                         args.skip, args.max, args.seed, sigmas=len(pairs), **variants).check()
        if args.precision not in PRECISIONS and args.precision != "auto":
            raise UserError(f"unknown precision {args.precision!r}; choose from auto, {', '.join(PRECISIONS)}")
        if (args.compile or args.precision not in ("auto", "fp32")) and (
                args.backend not in (None, "torch") or any(Path(m).suffix in (".onnx", ".pt2", ".plan") for m, _ in pairs)):
            raise UserError("--compile and --precision apply to the torch backend only")
        check_writable(args.out)  # before any model is loaded, probed or compiled
        # Processes wait at the final barrier for the slowest shard: allow for long runs.
        env = setup(args.device, timeout=datetime.timedelta(days=7))
        rank, finished = env.rank, False
        try:
            certifiers, params, choice = build_certifiers(args, pairs, env)
            dataset = load_dataset(params["dataset"], "test", args.data_dir)
            for certifier in certifiers:
                if certifier.input_shape is None:
                    certifier.check_input(dataset.input_shape, args.model)
                if certifier.input_shape != tuple(dataset.input_shape):
                    raise UserError(f"{args.model} takes inputs of shape {certifier.input_shape}, "
                                    f"{params['dataset']} images are {tuple(dataset.input_shape)}")
            rate = choice.rates.get(choice.runtime) if choice is not None else None
            meter = Meter(rate, "the model's rate that --precision auto timed", force=args.force)
            out = runner.run(certifiers[0] if len(certifiers) == 1 else certifiers, dataset, args.out, job, params,
                             rank=rank, world=env.world_size, meter=meter)
            if rank == 0:
                from rrcm.engine.analyze import summary_line
                from rrcm.engine.autoselect import recheck

                if choice is not None and (note := recheck(choice, meter.average, meter.span)):
                    print(note)

                sigmas = ", ".join(f"{c.sigma:g}" for c in certifiers)
                print(f"{out}: {job.mode} of {len(job.indices(len(dataset)))} {params['dataset']} test images at sigma "
                      f"{sigmas} done")
                print(summary_line(out, processes=env.world_size))
            finished = True
        finally:
            teardown(finished)
        return 0


def model_sigma_pairs(models: str, sigmas: str | None) -> list[tuple[str, float | None]]:
    """(model, sigma) for each certifier of a run: one model at each of several sigmas, one model per sigma, or
    one model at its own sigma (None)."""
    from rrcm.checks import check_number

    values = None
    if sigmas is not None:
        try:
            values = [float(v) for v in sigmas.split(",")]
        except ValueError:
            raise UserError(f"--sigma must be a number or comma-separated numbers, got {sigmas!r}") from None
        values = [check_number("--sigma", v, 0.0, math.inf, low_open=True) for v in values]
        if len(set(values)) != len(values):
            raise UserError(f"--sigma lists a sigma twice: {sigmas}")
    names = [models] if Path(models).exists() else models.split(",")
    if len(names) == 1:
        return [(names[0], v) for v in values] if values else [(names[0], None)]
    if values is None:
        return [(name, None) for name in names]
    if len(values) != len(names):
        raise UserError(f"--model names {len(names)} models for {len(values)} sigmas: give one model, or one per sigma")
    return list(zip(names, values))


def build_certifiers(args: argparse.Namespace, pairs: list[tuple[str, float | None]],
                     env) -> tuple[list, dict, Choice | None]:
    """A Certifier per (model, sigma) on this process's device, with the backend, precision and sampler asked for
    (`--precision auto` probes the runtime once, for the first), the sidecar's parameters of the run, and
    `--precision auto`'s runtime Choice (None without it)."""
    from rrcm.data import load_dataset
    from rrcm.datasets import DATASETS
    from rrcm.engine import backends, runner
    from rrcm.engine.certifier import Certifier

    device, rank = env.device, env.rank
    precision = "fp32" if args.precision == "auto" else args.precision  # auto: the fastest fp32 runtime
    options = {"compile": args.compile, "dtype": backends.PRECISIONS[precision]} \
        if args.compile or precision != "fp32" else {}
    batch = args.batch if args.batch is not None else (1000 if device.type == "cuda" else 128)
    certifiers, fingerprints, agreements, choice, dataset, train = [], [], [], None, None, None
    for spec, sigma in pairs:
        model, fingerprint = load_model(spec, sigma, device, args.backend)
        runner.check_batch(batch, getattr(model, "input_shape", None), device)  # before any batch is run
        check_inputs = None
        if precision != "fp32":  # another classifier than the float32 one: calibrated and checked on noisy training images
            from rrcm.engine.quantize import dataset_calibration

            if train is None:
                train = load_dataset(args.dataset or model.cfg.dataset, "train", args.data_dir)
            check_inputs = dataset_calibration(train, model.sigma, seed=1)
            if precision == "int8":
                options.update(calibration=dataset_calibration(train, model.sigma), static_batch=batch)
        if args.precision == "auto" and args.backend is None and not args.compile and not isinstance(model, str):
            from rrcm.engine.autoselect import build_runtime, select_runtime

            if choice is None:
                backend, choice = select_runtime(model, fingerprint, batch, device, rank=rank, world=env.world_size)
                if rank == 0:
                    print(choice.summary(batch), flush=True)
            else:  # the same network at another sigma: the same runtime
                backend = build_runtime(model, choice.runtime, device)
        else:  # an exported file runs at the sigma asked for (a graph with a sigma input needs one)
            at = {"sigma": sigma} if isinstance(model, str) and sigma is not None else {}
            backend = backends.make_backend(model, device, args.backend, **options, **at)
        if check_inputs is not None:
            agreements.append(precision_agreement(model, backend, check_inputs, precision, batch, verbose=rank == 0))
        sigma = sigma if sigma is not None else backend.info.sigma
        if sigma is None:
            raise UserError(f"{spec} records no sigma: give --sigma")
        name = args.dataset or backend.info.dataset  # checkpoint config or ONNX metadata
        if name is None:
            raise UserError(f"{spec} records no dataset: give --dataset")
        if name not in DATASETS:
            raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
        if dataset is not None and name != dataset:
            raise UserError(f"the models of one run must certify one dataset, got {dataset} and {name}")
        dataset = name
        certifiers.append(Certifier(model, DATASETS[name].num_classes, sigma, batch_size=batch, backend=backend,
                                    sound=args.sound, sampler=args.sampler, cuda_graphs=args.cuda_graphs))
        fingerprints.append(fingerprint)
    first = certifiers[0]
    several = len(certifiers) > 1
    params = {"model": args.model, "model_sha256": fingerprints if several else fingerprints[0],
              "sigma": [c.sigma for c in certifiers] if several else first.sigma, "dataset": dataset,
              "data_dir": args.data_dir, "batch": batch, "backend": first.backend.name, "device": str(device),
              "precision": precision, "compile": choice.compile if choice else args.compile,
              "sampler": first.sampler.name, "cuda_graphs": args.cuda_graphs}
    if agreements:
        params["agreement"] = round(min(agreements), 4)
    if first.backend.name == "torch" and first.backend.activation_bits == 7:  # recorded only then: older int8 runs resume
        params["int8_activation_bits"] = 7
    if args.sound:  # recorded only when set, so that older sidecars still resume
        params["sound"] = True
    return certifiers, params, choice


CERTIFY = _Command("certify", "certify test images (Cohen et al.'s CERTIFY), one TSV row each")
PREDICT = _Command("predict", "smoothed predictions with abstention (Cohen et al.'s PREDICT), one TSV row each")
