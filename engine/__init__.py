"""Randomized-smoothing certification (Cohen et al.'s CERTIFY / PREDICT)."""
from rrcm.engine.certifier import Certifier, CertifyResult

__all__ = ["Certifier", "CertifyResult"]
