"""Training: rRCM pre-training (contrastive denoising + consistency) and per-sigma fine-tuning."""
