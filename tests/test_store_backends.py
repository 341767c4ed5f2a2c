"""The backend interface: both implementations provide every operation the store calls."""

from __future__ import annotations

import inspect

import pytest

from ditf_pipeline.store.backends import Backend, ReadBackend, backend_for, store_location
from ditf_pipeline.store.backends.local import LocalBackend
from ditf_pipeline.store.backends.object import ObjectBackend


def _operations(protocol: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(protocol, inspect.isfunction) if not name.startswith("_")}


@pytest.mark.parametrize("implementation", [LocalBackend, ObjectBackend])
def test_each_backend_implements_every_operation_of_the_interface_with_its_parameters(implementation):
    for name in _operations(Backend):
        wanted = list(inspect.signature(getattr(Backend, name)).parameters)
        got = list(inspect.signature(getattr(implementation, name)).parameters)
        assert got == wanted, (implementation.__name__, name)


def test_a_local_path_gets_the_local_backend_which_is_a_backend(tmp_path):
    backend = backend_for(store_location(tmp_path / "s.zarr"))
    assert isinstance(backend, LocalBackend) and isinstance(backend, Backend)


def test_a_read_only_backend_needs_only_the_read_operations(tmp_path):
    """The seam a read-only backend (HTTP, a hub) plugs into: reads without any write operation."""

    class Reader:
        remote = True

    local, reader = LocalBackend(tmp_path), Reader()
    for name in _operations(ReadBackend):
        setattr(reader, name, getattr(local, name))
    assert isinstance(reader, ReadBackend)
    assert not isinstance(reader, Backend)  # no publish, lock, ...: refused where a writer is needed
    assert _operations(ReadBackend) < _operations(Backend)
