"""Every timeout setting accepts a number of seconds in (0, 365 days] or infinity, and
refuses anything else in one line when the config is read; infinity reaches the process
group as 365 days, a timeout torch accepts."""

from __future__ import annotations

import dataclasses
import datetime
import math
import subprocess
import sys

import pytest
from helpers import subprocess_env

from marscale.core.config import ConfigError
from marscale.core.timeouts import MAX_TIMEOUT_S, backend_seconds, check_timeout
from marscale.engine.config import RunConfig, load_train_config

TIMEOUT_SETTINGS = [f"run.{f.name}" for f in dataclasses.fields(RunConfig) if f.name.endswith("_timeout_s")]
"""Every timeout setting of the config (all live in `run:`)."""


def test_the_timeout_settings_are_found():
    assert "run.collective_timeout_s" in TIMEOUT_SETTINGS


def value_of(key: str, text: str) -> float:
    return getattr(load_train_config("demo", [f"{key}={text}"]).run, key.split(".")[1])


@pytest.mark.parametrize("key", TIMEOUT_SETTINGS)
@pytest.mark.parametrize(
    "text,seconds",
    [("600", 600.0), ("0.5", 0.5), ("31536000", MAX_TIMEOUT_S), (".inf", math.inf), ("inf", math.inf),
     ("Infinity", math.inf), ("+inf", math.inf)],
)
def test_a_timeout_accepts_seconds_and_infinity(key, text, seconds):
    assert value_of(key, text) == seconds


@pytest.mark.parametrize("key", TIMEOUT_SETTINGS)
@pytest.mark.parametrize("text", [".nan", "0", "-5", "-inf", "-.inf", "31536001", "1e10"])
def test_a_timeout_refuses_other_numbers_in_one_line(key, text):
    with pytest.raises(ConfigError) as err:
        load_train_config("demo", [f"{key}={text}"])
    message = str(err.value)
    assert "\n" not in message
    got = float(text.replace(".inf", "inf").replace(".nan", "nan"))
    assert (
        f"{key} must be > 0 seconds and at most 31536000 (365 days), or .inf for no limit; got {got}" in message
    )


@pytest.mark.parametrize("key", TIMEOUT_SETTINGS)
@pytest.mark.parametrize("text", ["nan", "abc", "30m", "'600'", "true", "[600]"])
def test_a_timeout_refuses_what_is_no_number_in_one_line(key, text):
    with pytest.raises(ConfigError) as err:
        load_train_config("demo", [f"{key}={text}"])
    assert "\n" not in str(err.value)
    assert f"'{key}' expects float, got " in str(err.value)


def test_backend_seconds_caps_infinity_and_keeps_the_rest():
    assert backend_seconds(math.inf) == MAX_TIMEOUT_S == 365 * 86400
    assert backend_seconds(600) == 600.0 and backend_seconds(MAX_TIMEOUT_S) == MAX_TIMEOUT_S
    datetime.timedelta(seconds=backend_seconds(math.inf))  # no OverflowError
    for bad in (math.nan, 0.0, -1.0, -math.inf, MAX_TIMEOUT_S * 2):
        with pytest.raises(ValueError, match="must be > 0 seconds"):
            backend_seconds(bad)
    check_timeout("x", math.inf)


def test_a_process_group_takes_the_longest_timeout():
    """gloo sets up and runs a collective with it (a timeout of 1e10 s passes the
    timedelta but overflows in torch: its rendezvous fails at once)."""
    code = (
        "import datetime, torch, torch.distributed as d\n"
        "from marscale.core.timeouts import backend_seconds\n"
        "from marscale.core.dist import free_port\n"
        "timeout = datetime.timedelta(seconds=backend_seconds(float('inf')))\n"
        "d.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1,"
        " timeout=timeout)\n"
        "x = torch.ones(1); d.all_reduce(x); d.barrier(); d.destroy_process_group()\n"
        "print('ok', x.item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ok 1.0"
