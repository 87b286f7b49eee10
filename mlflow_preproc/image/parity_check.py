"""The image build's parity check: ``python -m mlflow_preproc.image.parity_check MODEL_DIR``.

The ``preproc`` target's Dockerfile runs it once the model is in the image, before the image
is tagged: the model's reference records run in the image's own environment, as every start
of it would run them (:func:`~mlflow_preproc.runtime.parity.check_at_start`, with the
deployment's ``PARITY_CHECK``). Outputs other than those logged fail the build, exit 2 with
the diff, so no image and no deployment is made of them.
"""

from __future__ import annotations

import logging
import sys

from mlflow_preproc.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    from mlflow_preproc.runtime.flavor import _load_from_dir
    from mlflow_preproc.runtime.parity import ParityError, check_at_start

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mlflow_preproc.image.parity_check MODEL_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        loaded = _load_from_dir(argv[0])
        report = check_at_start(loaded.preprocessor, loaded.reference, argv[0])
    except (ParityError, ConfigError) as exc:
        print(f"mlflow-preproc: error: {exc}", file=sys.stderr)
        return 2
    if report is None:
        print(f"{argv[0]}: logged without reference records: nothing to check",
              file=sys.stderr)
    elif report.ok:
        print(report.headline(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
