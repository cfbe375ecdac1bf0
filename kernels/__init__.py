"""Per-batch device work of certification: writing noisy model inputs and counting predictions."""
from rrcm.kernels.counting import count_predictions
from rrcm.kernels.sampling import noisy_inputs

__all__ = ["count_predictions", "noisy_inputs"]
