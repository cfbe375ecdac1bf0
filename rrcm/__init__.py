"""rrcm: certified robustness with the Robust Representation Consistency Model."""
from rrcm.classifier import NoisyImageClassifier, load_classifier
from rrcm.errors import UserError

__version__ = "0.1.0"
__all__ = ["NoisyImageClassifier", "UserError", "load_classifier", "__version__"]
