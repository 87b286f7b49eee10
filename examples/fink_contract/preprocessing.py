"""ZTF alert features the way the Fink broker's model pipeline asks for them.

``pre_processing(alert)`` returns a feature vector, ``list[float]``, in the order of
``FEATURE_NAMES``; it never raises (a feature that cannot be computed is NaN) and takes well
under 5 ms per alert. The cutouts are dropped before it runs (``SKIP_CUTOUTS=true``).
"""

import math

FEATURE_NAMES = ["magpsf", "sigmapsf", "snr", "positive", "rb", "n_prv", "prv_mean_mag",
                 "prv_std_mag", "days_since_first"]

# What pre_processing reads: the decoder reads only these of an alert's ~3,000 values
# (docs/guides/input-fields.md).
INPUT_FIELDS = ["candidate.magpsf", "candidate.sigmapsf", "candidate.isdiffpos", "candidate.rb",
                "candidate.jd", "prv_candidates.magpsf", "prv_candidates.jd"]

NAN = float("nan")


def pre_processing(alert: dict) -> list[float]:
    try:
        c = alert["candidate"]
        history = [p for p in alert.get("prv_candidates") or [] if p.get("magpsf") is not None]
        mags = [p["magpsf"] for p in history]
        mean = sum(mags) / len(mags) if mags else NAN
        std = math.sqrt(sum((m - mean) ** 2 for m in mags) / len(mags)) if mags else NAN
        first = min((p["jd"] for p in history), default=c["jd"])
        return [
            float(c["magpsf"]),
            float(c["sigmapsf"]),
            float(c["magpsf"] / c["sigmapsf"]) if c["sigmapsf"] else NAN,
            1.0 if c["isdiffpos"] in ("t", "1") else 0.0,
            float(c["rb"]) if c.get("rb") is not None else NAN,
            float(len(mags)),
            mean,
            std,
            float(c["jd"] - first),
        ]
    except (KeyError, TypeError, ValueError):
        return [NAN] * len(FEATURE_NAMES)
