"""The Fink contract's features over columns: ``batch_format="arrow"``.

The same ``FEATURE_NAMES`` and values as ``preprocessing.py``, computed for a whole batch at
once with polars expressions over the alerts' Arrow columns, the way Fink's science modules
are written. Log it with ``batch_format="arrow"``; with the columnar extra installed
(``pip install '.[columnar]'`` in the mlflow-preproc clone) a stream hands it the columns
polars-avro decoded, with no record built in between::

    mlflow.preproc.log_model("examples/fink_contract/columnar.py", name="features",
                             batch_format="arrow", input_example=alert)
"""

import polars as pl

FEATURE_NAMES = ["magpsf", "sigmapsf", "snr", "positive", "rb", "n_prv", "prv_mean_mag",
                 "prv_std_mag", "days_since_first"]

INPUT_FIELDS = ["candidate.magpsf", "candidate.sigmapsf", "candidate.isdiffpos", "candidate.rb",
                "candidate.jd", "prv_candidates.magpsf", "prv_candidates.jd"]

NAN = float("nan")


def pre_processing(alerts):
    """A ``pyarrow.Table`` of alerts in, a table of their features out (one row each)."""
    c = pl.col("candidate")
    history = pl.col("prv_candidates").fill_null([]).list.eval(
        pl.element().filter(pl.element().struct.field("magpsf").is_not_null()))
    mags = history.list.eval(pl.element().struct.field("magpsf").cast(pl.Float64))
    n = mags.list.len()
    std = mags.list.eval((pl.element() - pl.element().mean()).pow(2).mean().sqrt()).list.first()
    first = history.list.eval(pl.element().struct.field("jd")).list.min().fill_null(
        c.struct.field("jd"))  # no history: the alert itself, as preprocessing.py does
    magpsf = c.struct.field("magpsf").cast(pl.Float64)
    sigmapsf = c.struct.field("sigmapsf").cast(pl.Float64)
    return pl.from_arrow(alerts).select(
        magpsf.alias("magpsf"),
        sigmapsf.alias("sigmapsf"),
        pl.when(sigmapsf != 0).then(magpsf / sigmapsf).otherwise(NAN).alias("snr"),
        c.struct.field("isdiffpos").is_in(["t", "1"]).cast(pl.Float64).alias("positive"),
        c.struct.field("rb").cast(pl.Float64).fill_null(NAN).alias("rb"),
        n.cast(pl.Float64).alias("n_prv"),
        pl.when(n > 0).then(mags.list.mean()).otherwise(NAN).alias("prv_mean_mag"),
        pl.when(n > 0).then(std).otherwise(NAN).alias("prv_std_mag"),
        (c.struct.field("jd") - first).alias("days_since_first"),
    ).to_arrow()
