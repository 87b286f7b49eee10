"""CPU and memory as Kubernetes writes them (``500m``, ``0.5``, ``256Mi``, ``1e9``), read into
the numbers Docker takes (``nano_cpus``, ``mem_limit`` in bytes).

One grammar for both backends, so ``-C memory_limit=256Mi`` means the same on a Docker engine
and in a pod, and a value either would refuse is refused before anything is built.
"""

from __future__ import annotations

import re
from decimal import Decimal

# Kubernetes' resource.Quantity: a number, then a binary or decimal suffix or an exponent.
_QUANTITY = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                       r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE]|[eE][+-]?[0-9]+)?")
_FACTORS = {None: Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3,
            "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
            "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
            **{s: Decimal(2) ** (10 * (i + 1)) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti",
                                                                      "Pi", "Ei"))}}
# Docker refuses smaller memory limits ("Minimum memory limit allowed is 6MB") and CPU limits
# below 0.01 CPUs; said here, before the image is built, rather than by the engine after.
DOCKER_MIN_MEMORY = 6 * 2**20
DOCKER_MIN_NANO_CPUS = 10_000_000


class QuantityError(ValueError):
    """A value that is not a Kubernetes quantity; the message says what one looks like."""


def quantity(value: str) -> Decimal:
    """``value`` (a Kubernetes quantity) as a number; raises :class:`QuantityError`."""
    match = _QUANTITY.fullmatch(value.strip())
    if not match:
        raise QuantityError("is not a Kubernetes quantity (a number with an optional suffix: "
                            "500m or 0.5 CPUs, 256Mi or 1Gi of memory)")
    number, suffix = Decimal(match["number"]), match["suffix"]
    if suffix and suffix[0] in "eE":
        return number * Decimal(10) ** int(suffix[1:])
    return number * _FACTORS[suffix]


def memory_bytes(value: str) -> int:
    """Memory ``value`` in whole bytes (a fraction of a byte dropped)."""
    return int(quantity(value))


def nano_cpus(value: str) -> int:
    """CPU ``value`` in units of 1e-9 CPUs (Docker's ``--cpus`` times 10^9)."""
    return int(quantity(value) * 10**9)


def docker_limits(limits: dict[str, str]) -> dict[str, int]:
    """The ``containers.run`` arguments of Kubernetes-style ``limits`` (``cpu``, ``memory``)."""
    arguments = {}
    if limits.get("memory"):
        arguments["mem_limit"] = memory_bytes(limits["memory"])
    if limits.get("cpu"):
        arguments["nano_cpus"] = nano_cpus(limits["cpu"])
    return arguments
