"""Randomized-smoothing certification (Cohen et al.'s CERTIFY / PREDICT) and cascades over several sigmas."""
__all__ = ["Certifier", "CertifyResult", "Cascade"]
_MODULES = {"Certifier": "certifier", "CertifyResult": "certifier", "Cascade": "cascade"}


def __getattr__(name: str):
    # Imported on first use, so that the command line's light modules (analyze, --help) do not load torch.
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(f"rrcm.engine.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'rrcm.engine' has no attribute {name!r}")
