"""Differential privacy: DPZero's private scalar estimator, the accountant and noise calibration, DP-SGD via Opacus."""

from slimtune.privacy.accountant import PrivacyAccountant, PrivacySpec, calibrate_noise
from slimtune.privacy.budget import epsilon, noise_multiplier  # the accountant in one call (Python API)
from slimtune.privacy.dpzero import PrivateDifference

__all__ = ["PrivacyAccountant", "PrivacySpec", "calibrate_noise", "PrivateDifference", "epsilon", "noise_multiplier"]
