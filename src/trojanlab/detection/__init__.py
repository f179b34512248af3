"""Backdoor detection: Neural Cleanse (reverse-engineered triggers for every label + MAD outlier test)."""

from .neural_cleanse import NCConfig, NCResult, blend, mad_outlier_test, reverse_engineer

__all__ = ["NCConfig", "NCResult", "blend", "mad_outlier_test", "reverse_engineer"]
