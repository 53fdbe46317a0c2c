"""`make_mesh` layout and validation, and the Ulysses head-count check."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from longvila_jax.parallel import AXES, make_mesh


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """Just what `make_mesh` reads, so multi-process layouts can be checked on one host."""

    id: int
    process_index: int


@pytest.mark.parametrize("dims", [(1, 1, 8), (2, 1, 4), (2, 2, 2), (1, 8, 1), (8, 1, 1)])
def test_shape_and_order(dims):
    mesh = make_mesh(*dims)
    assert mesh.axis_names == AXES == ("data", "node", "local")
    assert mesh.devices.shape == dims
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())


def test_devices_are_sorted_process_major(rng):
    # Two hosts of four devices each, ids interleaved across hosts and shuffled.
    devices = [FakeDevice(id=i, process_index=i % 2) for i in range(8)]
    mesh = make_mesh(1, 2, 4, devices=list(rng.permutation(devices)))
    assert [[d.process_index for d in row] for row in mesh.devices[0]] == [[0] * 4, [1] * 4]
    assert [d.id for d in mesh.devices.flat] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_explicit_device_subset():
    mesh = make_mesh(1, 1, 4, devices=jax.devices()[4:])
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[4:]]


@pytest.mark.parametrize("dims, message", [
    ((0, 1, 8), "data=0 must be a positive int"),
    ((1, -2, 8), "node=-2 must be a positive int"),
    ((1, 1, 8.0), "local=8.0 must be a positive int"),
    ((1, 1, True), "local=True must be a positive int"),
    ((1, 2, 8), "1*2*8 = 16 but there are 8 devices"),
    ((3, 1, 2), "3*1*2 = 6 but there are 8 devices"),
])
def test_bad_sizes(dims, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        make_mesh(*dims)


def fake_hosts(counts):
    """Fake devices, `counts[p]` of them on process p, numbered consecutively."""
    processes = [p for p, count in enumerate(counts) for _ in range(count)]
    return [FakeDevice(id=i, process_index=p) for i, p in enumerate(processes)]


@pytest.mark.parametrize("counts, local", [((4, 4), 8), ((6, 2), 4), ((3, 3, 2), 2)])
def test_local_group_may_not_span_processes(counts, local):
    with pytest.raises(ValueError, match=f"local={local} does not divide the [0-9]+ devices"):
        make_mesh(sum(counts) // local, 1, local, devices=fake_hosts(counts))


def test_uneven_hosts_are_fine_when_local_divides_each():
    mesh = make_mesh(4, 1, 2, devices=fake_hosts((6, 2)))
    assert [{d.process_index for d in row} for row in mesh.devices.reshape(-1, 2)] == [
        {0}, {0}, {0}, {1}]

