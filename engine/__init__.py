"""Randomized-smoothing certification (Cohen et al.'s CERTIFY / PREDICT)."""
