"""Clean accuracy, attack success rate and prediction helpers shared by every attack and defense."""

from .metrics import attack_success_rate, clean_accuracy, evaluate_model, predict

__all__ = ["attack_success_rate", "clean_accuracy", "evaluate_model", "predict"]
