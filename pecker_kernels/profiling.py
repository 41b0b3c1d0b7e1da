"""NVTX ranges around the package's ops, in one domain so Nsight Systems groups them.

Ranges (domain ``pecker_kernels``): ``select``, ``write_masks``, ``update``. A range costs about a
microsecond of Python when no profiler is attached (nvtx returns at once); without the ``nvtx`` package
it costs nothing beyond the ``with`` statement.
"""

from __future__ import annotations

from typing import ClassVar

DOMAIN = "pecker_kernels"

try:
    import nvtx as _nvtx

    _domain = _nvtx.get_domain(DOMAIN)
except ImportError:  # profiling is optional
    _domain = None


class nvtx_range:
    """Marks the enclosed work as a range called ``name`` in Nsight Systems."""

    _attributes: ClassVar[dict[str, object]] = {}  # built once per name: building them is the costly part

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __enter__(self) -> None:
        if _domain is None:
            return
        attributes = self._attributes.get(self._name)
        if attributes is None:
            attributes = self._attributes[self._name] = _domain.get_event_attributes(message=self._name)
        _domain.push_range(attributes)

    def __exit__(self, *exc: object) -> None:
        if _domain is not None:
            _domain.pop_range()
