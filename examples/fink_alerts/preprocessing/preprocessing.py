"""Features of a ZTF alert: the current detection plus its light-curve history.

pre_processing(alert) -> dict. The cutout image stamps are dropped before this runs
(SKIP_CUTOUTS=true), so only the tabular part of the alert arrives here.
"""

from lightcurve import history_stats

BANDS = {1: "g", 2: "r", 3: "i"}


def pre_processing(alert: dict) -> dict | None:
    c = alert["candidate"]
    if c.get("rb") is not None and c["rb"] < 0.3:
        return None  # likely a bogus subtraction artefact
    stats = history_stats(alert.get("prv_candidates") or [], c["jd"])
    return {
        "objectId": alert["objectId"],
        "candid": alert["candid"],
        "band": BANDS.get(c["fid"], "?"),
        "magpsf": c["magpsf"],
        "sigmapsf": c["sigmapsf"],
        "rb": c.get("rb"),
        "positive": c["isdiffpos"] in ("t", "1"),
        **stats,
    }
