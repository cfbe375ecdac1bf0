"""Per-image class counts of a batch of logits, without leaving the device."""
from __future__ import annotations

import torch


def count_predictions(logits: torch.Tensor, image_ids: torch.Tensor, num_images: int) -> torch.Tensor:
    """(num_images, C) int64 counts of argmax(logits) per image; image_ids (B,) names each row's image."""
    num_classes = logits.shape[1]
    flat = image_ids * num_classes + logits.argmax(dim=1)
    counts = torch.zeros(num_images * num_classes, dtype=torch.int64, device=logits.device)
    # index_add_, not bincount: on CUDA bincount reads its input's range back to the host (a synchronization).
    return counts.index_add_(0, flat, torch.ones_like(flat)).view(num_images, num_classes)
