"""`rrcm pretrain` and `rrcm finetune` on the command line: their options, light to import (`--help` loads no
torch); running one imports its trainer (rrcm.train.pretrain, rrcm.train.finetune)."""
from __future__ import annotations

import argparse

from rrcm.datasets import DATASETS
from rrcm.presets import PRESETS

DEFAULT_STEPS = 5000  # pre-training
DEFAULT_EPOCHS = 10  # fine-tuning


def add_model_arguments(p: argparse.ArgumentParser, preset_default: str | None, preset_note: str = "") -> None:
    default = f" (default {preset_default})" if preset_default else ""
    p.add_argument("--preset", default=preset_default, help=f"model size preset: {', '.join(PRESETS)}{preset_note}{default}")
    p.add_argument("--embed-dim", type=int, help="override the preset's width D")
    p.add_argument("--depth", type=int, help="override the preset's number of transformer blocks")
    p.add_argument("--heads", type=int, help="override the preset's number of attention heads")
    p.add_argument("--patch-size", type=int, help="override the preset's patch size")


def add_training_arguments(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--dataset", help=f"training data: {', '.join(DATASETS)} (default: the preset's or checkpoint's)")
    p.add_argument("--data-dir", help="dataset folder (default: the dataset's standard folder, if it has one)")
    p.add_argument("--max-train-images", type=int, help="train on the first N training images only (quick runs)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size, split over processes (default 256)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--warmup", type=int, help="linear warm-up steps, then cosine decay (default: a tenth of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="train for about this long: a few timed steps (undone again) measure the throughput and fix "
                        "the number of steps, at most --steps/--epochs when given; the run also stops at the first log "
                        "line past the budget. The plan is recorded in config.json and kept by a resume")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization, data order, augmentation and noise (default 0)")
    p.add_argument("--out", required=True, help="run folder: checkpoint, train_state.pt and log.jsonl; "
                   "re-running the same command resumes there")
    p.add_argument("--save-every", type=int, default=500,
                   help="save the training state every N steps, 0: only at the end (default 500)")
    p.add_argument("--log-every", type=int, default=20, help="write a log.jsonl line every N steps (default 20)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available); "
                   "under torchrun each process takes cuda:LOCAL_RANK")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (default auto: bf16 on CUDA, fp32 on CPU); fp16 uses a gradient scaler")


class _Pretrain:
    help = "pre-train an rRCM encoder (contrastive denoising + consistency)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, preset_default="fmnist-s")
        p.add_argument("--steps", type=int,
                       help=f"optimizer steps (default {DEFAULT_STEPS}; with --time-budget: at most this many, default no limit)")
        add_training_arguments(p, lr=5e-4)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from rrcm.distributed import run_in_process_group
        from rrcm.train.pretrain import pretrain

        return run_in_process_group(pretrain, args)


class _Finetune:
    help = "fine-tune an encoder into a classifier for one noise level, or one for several"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        start = p.add_mutually_exclusive_group(required=True)
        start.add_argument("--init", help="pre-trained encoder checkpoint folder (from rrcm pretrain; its projector is "
                                          "dropped), or a classifier's (from rrcm finetune; its encoder is the start, "
                                          "its head is dropped)")
        start.add_argument("--from-scratch", action="store_true",
                           help="random initialization: the Gaussian augmentation + consistency baseline")
        noise = p.add_mutually_exclusive_group(required=True)
        noise.add_argument("--sigma", type=float, help="pixel-space noise std to train for (> 0), e.g. 0.25, 0.5, 1.0")
        noise.add_argument("--sigmas", metavar="S1,S2,...",
                           help="one classifier for each of these sigmas, e.g. 0.25,0.5,1.0: each image draws one of "
                                "them (uniformly) per step")
        noise.add_argument("--sigma-range", metavar="LO:HI",
                           help="one classifier for every sigma in [LO, HI], e.g. 0.12:1.0: each image draws its sigma "
                                "log-uniformly per step")
        p.add_argument("--lam", type=float, help="consistency weight lambda (default 10 for sigma <= 0.25, else 20; with "
                                                 "--sigmas / --sigma-range that rule at each image's sigma)")
        p.add_argument("--eta", type=float, default=0.5, help="entropy weight eta (default 0.5)")
        p.add_argument("--diversity", type=float, default=0.0,
                       help="weight of the cascade's diversity term (default 0: off): an image whose noisy copies miss "
                            "its label trades its consistency and entropy terms for this weight times KL(uniform || "
                            "average prediction), so that at its sigma the votes spread instead of settling on a "
                            "wrong class (Jeong & Shin, 2023)")
        p.add_argument("--layer-decay", type=float,
                       help="layer-wise lr decay (default 0.65 with --init, 1.0 (none) with --from-scratch)")
        length = p.add_mutually_exclusive_group()
        length.add_argument("--epochs", type=float,
                            help=f"passes over the training images (default {DEFAULT_EPOCHS:g}; with --time-budget: at most "
                                 "this many, default no limit)")
        length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
        p.add_argument("--eval-images", type=int, default=1000,
                       help="at the end, accuracy on one noisy draw of the first N test images, 0: skip (default 1000)")
        add_model_arguments(p, preset_default=None, preset_note=" (with --from-scratch; default fmnist-s)")
        add_training_arguments(p, lr=5e-4)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from rrcm.distributed import run_in_process_group
        from rrcm.train.finetune import finetune

        return run_in_process_group(finetune, args)


PRETRAIN = _Pretrain()
FINETUNE = _Finetune()
