"""marscale/core/dist.py without processes: the process group's timeout, and telling a lost
peer from other errors (the two-host tests in tests/test_multinode.py see it happen)."""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as torch_dist

from marscale.core import dist

GLOO_RESET = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.77.0.2]:47294: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or crashing"
)
GLOO_TIMEOUT = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms "
    "for recv operation to complete"
)


def test_a_gloo_reset_names_the_peer_and_the_timeout():
    lost = dist.lost_peer(torch_dist.DistBackendError(GLOO_RESET))
    assert isinstance(lost, dist.PeerLost)
    text = str(lost)
    assert "lost peer 10.77.0.2:47294" in text
    assert "Connection reset by peer" in text
    assert f"run.collective_timeout_s={dist.collective_timeout().total_seconds():g} s" in text


def test_a_timeout_raised_from_inside_the_step_is_found_through_the_cause_chain():
    try:
        try:
            raise RuntimeError(GLOO_TIMEOUT)
        except RuntimeError as inner:
            raise ValueError("while reducing the metrics") from inner
    except ValueError as outer:
        lost = dist.lost_peer(outer)
    assert lost is not None and "lost a peer (the backend did not say which)" in str(lost)
    assert "Timed out waiting 20000ms" in str(lost)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory"),
        ValueError("Timed out waiting for the shard list"),  # not from a collective
        TimeoutError("timed out"),
    ],
)
def test_other_errors_are_not_a_lost_peer(error):
    assert dist.lost_peer(error) is None


def test_collective_timeout_is_a_timedelta_for_later_groups():
    assert isinstance(dist.collective_timeout(), datetime.timedelta)
    assert dist.collective_timeout().total_seconds() > 0
