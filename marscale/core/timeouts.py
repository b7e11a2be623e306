"""Timeout settings: which values in seconds a timeout accepts, and what the backend is given.

A timeout setting (`run.collective_timeout_s`, ...) accepts a number of seconds in
(0, MAX_TIMEOUT_S], or `.inf` (YAML) / `inf` for no limit. Anything else is refused
when the config is read, in one line naming the setting, the value and this range
(`check_timeout`): NaN, zero and negative numbers have no meaning as a wait, and a
finite value above the maximum would not reach the backend intact (below).

Why a maximum: torch hands a process group's timeout to C++ as 64-bit nanoseconds, and
`datetime.timedelta` itself stops at 999,999,999 days. `.inf` does not convert at all
(OverflowError); 1e10 s (317 years) converts, overflows in C++ and makes the rendezvous
fail at once ("timed out after 0 seconds"). 365 days is far below both limits and far
above any wait a job means, so `.inf` becomes that (`backend_seconds`).
"""

from __future__ import annotations

import math

MAX_TIMEOUT_S = 365 * 24 * 3600.0
"""The longest finite timeout a setting accepts (365 days), and what `.inf` means to the
process group (`backend_seconds`)."""


def timeout_problem(name: str, seconds: float) -> str | None:
    """Why `seconds` is not a valid value of timeout setting `name` (a dotted key), or None."""
    if math.isinf(seconds) and seconds > 0:
        return None
    if 0 < seconds <= MAX_TIMEOUT_S:  # False for NaN as well
        return None
    return (
        f"{name} must be > 0 seconds and at most {MAX_TIMEOUT_S:.0f} (365 days), or .inf for no limit; got {seconds}"
    )


def check_timeout(name: str, seconds: float) -> None:
    """Raise ValueError (one line: the setting, the value, the accepted range) unless
    `seconds` is a valid value of timeout setting `name`."""
    problem = timeout_problem(name, seconds)
    if problem is not None:
        raise ValueError(problem)


def backend_seconds(seconds: float) -> float:
    """The seconds to give the backend (a `datetime.timedelta` for torch.distributed) for
    a valid timeout setting: the value itself, or MAX_TIMEOUT_S for `.inf`."""
    check_timeout("timeout", seconds)
    return min(float(seconds), MAX_TIMEOUT_S)
