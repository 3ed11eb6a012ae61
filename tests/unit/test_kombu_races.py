"""kombu's Redis transport after a lost broker connection: the races the worker patches
(workers/reaper.py, tolerate_kombu_close_race), reproduced on kombu's own classes."""

import pytest
from kombu.transport import redis as kredis


def detached_qos():
    # a channel whose connection is gone: kombu's own conn_or_acquire -> _create_client -> pool ->
    # _connparams reads self.connection.client and raises, as in the worker log of the race
    channel = kredis.Channel.__new__(kredis.Channel)
    channel.connection, channel._pool, channel._async_pool = None, None, None
    return kredis.QoS(channel)


def test_kombu_itself_raises_on_a_detached_channel():
    # what the patch is for: the ack's removal from `unacked` (not patched) cannot reach Redis
    with pytest.raises(AttributeError):
        detached_qos()._remove_from_indices("tag-1")


@pytest.mark.parametrize("op", ["ack", "reject"])
def test_an_ack_on_a_detached_channel_is_forgotten_not_fatal(op):
    from gristmill.workers.reaper import tolerate_kombu_close_race
    tolerate_kombu_close_race()
    qos = detached_qos()
    qos._delivered["tag-1"] = object()
    getattr(kredis.QoS, op)(qos, "tag-1")  # no AttributeError out of the event loop
    assert "tag-1" in qos._dirty, "forgotten locally, as kombu's own ack does"
