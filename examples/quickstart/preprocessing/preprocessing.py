"""The preprocessing contract: pre_processing(record) -> dict, None (drop) or list of dicts."""

from features import BANDS, snr


def pre_processing(data: dict) -> dict | None:
    candidate = data["candidate"]
    if candidate["rb"] < 0.5:
        return None  # a bogus detection: drop it
    return {
        "objectId": data["objectId"],
        "band": BANDS[candidate["fid"]],
        "magpsf": candidate["magpsf"],
        "snr": round(snr(candidate["magpsf"], candidate["sigmapsf"]), 3),
        "positive": candidate["isdiffpos"] in ("t", "1"),
    }
