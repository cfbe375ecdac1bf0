"""The training objectives (method.md sections 4 and 5), as per-sample losses where that matters."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TEMPERATURE = 0.2


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float = TEMPERATURE, key_offset: int = 0) -> torch.Tensor:
    """Per-sample InfoNCE (B,) of queries (B, D) against keys (K, D), K >= key_offset + B.

    Both sides are L2-normalized; query j's positive is key `key_offset + j` (its own image when the
    keys are the batches of all processes concatenated), every other key is a negative. Computed in
    float32, also under autocast.
    """
    with torch.autocast(queries.device.type, enabled=False):
        q = F.normalize(queries.float(), dim=1)
        k = F.normalize(keys.float(), dim=1)
        logits = q @ k.T / temperature
        positives = torch.arange(len(q), device=q.device) + key_offset
        return F.cross_entropy(logits, positives, reduction="none")


def symmetric_info_nce(q_a: torch.Tensor, q_b: torch.Tensor, k_a: torch.Tensor, k_b: torch.Tensor,
                       temperature: float = TEMPERATURE, key_offset: int = 0) -> torch.Tensor:
    """Per-sample contrastive term: view a's queries against view b's keys and the swap, averaged.

    The average (not the sum) keeps this term on the scale of one InfoNCE, the balance the rRCM
    loss `contrastive + consistency` has with a one-directional contrastive term.
    """
    return 0.5 * (info_nce(q_a, k_b, temperature, key_offset) + info_nce(q_b, k_a, temperature, key_offset))


def consistency_finetune_loss(logits_per_copy: list[torch.Tensor], labels: torch.Tensor, lam: float | torch.Tensor,
                              eta: float, diversity: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy + consistency regularization (Jeong & Shin, 2020) over m noisy copies.

    loss = mean_j CE(logits_j, y) + lam * mean_j KL(p_avg || p_j) + eta * H(p_avg), p_avg the mean
    of the copies' softmax, everything averaged over the batch. KL is taken from the average to
    each copy, as in Jeong & Shin and the rRCM code; with eta = lam the last two terms are the
    cross-entropy of each copy against p_avg. `lam` is one weight, or one per image (B,) (a classifier
    for several sigmas: each image's weight for its sigma). Returns (loss, {"ce", "kl", "entropy"}) with
    the parts unweighted and detached.

    `diversity` > 0 adds the cascade's objective (after Jeong & Shin, 2023: consistent where the image is
    recoverable, diverse where it is not). An image whose copies do not recover its label (argmax p_avg != y)
    trades its consistency and entropy terms for `diversity * KL(uniform || p_avg)`: its copies' average is
    pushed toward the uniform distribution, so that no class gathers the votes at that noise level and a
    cascade stage hands the image on instead of answering wrongly. Its cross-entropy stays, so the classifier
    still learns what it can recover. Per image: CE + (recovered ? lam * KL + eta * H : diversity * KL(U || p_avg)),
    averaged over the batch; the parts then add "unrecovered" (the fraction of such images) and "spread"
    (the mean KL(U || p_avg) over all images). `diversity` = 0 is the loss above, computed as before.
    """
    if len(logits_per_copy) < 2:
        raise ValueError("consistency regularization needs at least 2 noisy copies")
    log_probs = torch.stack([F.log_softmax(z.float(), dim=1) for z in logits_per_copy])  # (m, B, K)
    ce = F.nll_loss(log_probs.flatten(0, 1), labels.repeat(len(log_probs)))
    # In log space throughout, so a softmax that underflows to 0 gives no 0 * log 0 = NaN gradient.
    log_avg = torch.logsumexp(log_probs, 0) - math.log(len(log_probs))
    p_avg = log_avg.exp()
    kl_per_copy = (p_avg * (log_avg - log_probs)).sum(2)  # (m, B)
    kl = kl_per_copy.mean()
    ent = -(p_avg * log_avg).sum(1).mean()
    parts = {"ce": ce.detach(), "kl": kl.detach(), "entropy": ent.detach()}
    if diversity == 0:
        weighted = (lam * kl_per_copy).mean() if isinstance(lam, torch.Tensor) else lam * kl
        return ce + weighted + eta * ent, parts
    unrecovered = (log_avg.argmax(1) != labels).float()  # (B,); an argmax: no gradient flows through the gate
    ce_per_image = -log_probs.gather(2, labels.view(1, -1, 1).expand(len(log_probs), -1, 1)).squeeze(2).mean(0)
    consistency = (lam * kl_per_copy).mean(0) - eta * (p_avg * log_avg).sum(1)
    spread = -log_avg.mean(1) - math.log(log_avg.shape[1])  # KL(uniform || p_avg)
    loss = (ce_per_image + (1 - unrecovered) * consistency + unrecovered * diversity * spread).mean()
    return loss, {**parts, "unrecovered": unrecovered.mean(), "spread": spread.detach().mean()}
