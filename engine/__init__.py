"""Randomized-smoothing certification (Cohen et al.'s CERTIFY / PREDICT)."""
__all__ = ["Certifier", "CertifyResult"]


def __getattr__(name: str):
    # Imported on first use, so that the command line's light modules (analyze, --help) do not load torch.
    if name in __all__:
        from rrcm.engine import certifier

        return getattr(certifier, name)
    raise AttributeError(f"module 'rrcm.engine' has no attribute {name!r}")
