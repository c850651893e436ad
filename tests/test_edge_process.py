"""The edge in its own process (``EdgeProcess`` + ``PipeTransport``): same outputs and bytes as in-process,
bad frames answered with an error, clean start-up failures and shutdown."""

from __future__ import annotations

import pytest

from covspec.data.shapes import load_split
from covspec.errors import InputError
from covspec.models.loading import load_adapter
from covspec.protocol import ErrorReply, Link
from covspec.runtime.device import Device, DeviceSettings
from covspec.runtime.edge import Edge
from covspec.runtime.edge_process import EdgeProcess
from covspec.runtime.engine import colocated_profile
from covspec.runtime.transport import InProcessTransport

SETTINGS = {
    "vanilla_sd": DeviceSettings(method="vanilla_sd", max_new_tokens=24, gamma=4),
    "covspec": DeviceSettings(method="covspec", max_new_tokens=24, gamma=4),
    "covspec+branching": DeviceSettings(
        method="covspec", max_new_tokens=24, gamma=4, policy="adaptive", branch_budget=3
    ),
}


@pytest.fixture(scope="module")
def pair():
    return load_adapter("toy-target"), load_adapter("toy-draft")


@pytest.fixture(scope="module")
def edge_process():
    with EdgeProcess("toy-target", links=len(SETTINGS) + 2) as proc:
        yield proc


def _run(draft, transport, settings, sample):
    try:
        return Device(draft, transport, settings).run(sample.image(), sample.question)
    finally:
        transport.close()


def test_outputs_and_bytes_match_the_in_process_edge(pair, edge_process):
    target, draft = pair
    edge = Edge(target)
    samples = load_split("test", 2, offset=5)
    links = {name: edge_process.transport(Link(colocated_profile())) for name in SETTINGS}
    for name, settings in SETTINGS.items():
        remote = links[name]
        for sample in samples:
            local = InProcessTransport(edge.handle, Link(colocated_profile()))
            expected = _run(draft, local, settings, sample)
            # the pipe transport stays open over several requests, as a device's link does
            got = Device(draft, remote, settings).run(sample.image(), sample.question)
            assert got.token_ids == expected.token_ids, (name, sample.sample_id)
            if settings.policy == "fixed":  # deterministic rounds: the very same frames
                assert got.traffic == expected.traffic, name
        remote.close()


def test_a_bad_frame_gets_an_error_reply_and_the_link_keeps_serving(pair, edge_process):
    _, draft = pair
    transport = edge_process.transport(Link(colocated_profile()))
    transport.send_raw(b"\x00not a frame")
    reply = transport.recv(timeout=30)
    assert isinstance(reply, ErrorReply)
    sample = load_split("test", 1)[0]
    result = _run(draft, transport, SETTINGS["covspec"], sample)
    assert result.token_ids and result.rounds > 0


def test_close_ends_the_process(edge_process):
    transport = edge_process.transport(Link(colocated_profile()))
    edge_process.close()
    assert not edge_process._proc.is_alive()
    with pytest.raises(RuntimeError, match="taken"):
        edge_process.transport(Link(colocated_profile()))
    transport.close()  # idempotent after the process closed it
    edge_process.close()


def test_a_missing_checkpoint_fails_before_the_spawn(tmp_path):
    with pytest.raises(InputError, match=r"models\.target\.path: checkpoint directory .* does not exist"):
        EdgeProcess(str(tmp_path / "missing"), links=1)


def test_a_load_failure_in_the_edge_process_is_reported_with_its_cause(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"^edge process: ") as info:
        EdgeProcess(str(tmp_path), links=1)
    assert "config" in str(info.value).lower() or "json" in str(info.value).lower()
