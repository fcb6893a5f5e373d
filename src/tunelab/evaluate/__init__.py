from tunelab.evaluate.metrics import EvalResult, evaluate, exact_match, normalize_answer

__all__ = ["evaluate", "EvalResult", "exact_match", "normalize_answer"]
