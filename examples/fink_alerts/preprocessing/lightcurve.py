"""Light-curve statistics from an alert's previous detections."""

import math


def history_stats(prv_candidates: list[dict], jd: float) -> dict:
    mags = [p["magpsf"] for p in prv_candidates if p.get("magpsf") is not None]
    jds = [p["jd"] for p in prv_candidates if p.get("magpsf") is not None]
    if not mags:
        return {"n_prv": 0, "prv_mean_mag": None, "prv_std_mag": None, "days_since_first": 0.0}
    mean = sum(mags) / len(mags)
    std = math.sqrt(sum((m - mean) ** 2 for m in mags) / len(mags))
    return {"n_prv": len(mags), "prv_mean_mag": round(mean, 4), "prv_std_mag": round(std, 4),
            "days_since_first": round(jd - min(jds), 4)}
