"""Feature helpers, imported by preprocessing.py: captured with it when the model is logged."""

BANDS = {1: "g", 2: "r", 3: "i"}


def snr(magpsf: float, sigmapsf: float) -> float:
    """Signal-to-noise ratio of a PSF magnitude (1.0857 = 2.5 / ln 10)."""
    return 1.0857 / sigmapsf if sigmapsf > 0 else 0.0
