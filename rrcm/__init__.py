"""rrcm: certified robustness with the Robust Representation Consistency Model."""
from rrcm.errors import UserError

__version__ = "0.1.0"
__all__ = ["NoisyImageClassifier", "UserError", "load_classifier", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `rrcm --help` and `import rrcm.errors` do not load torch.
    if name in ("NoisyImageClassifier", "load_classifier"):
        from rrcm import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'rrcm' has no attribute {name!r}")
