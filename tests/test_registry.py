"""The registry: decorator registration, lazy discovery, and 'did you mean' on unknown names."""

from __future__ import annotations

import pytest

from mmke.errors import UnknownNameError
from mmke.registry import Registry, benchmarks


def test_register_and_get() -> None:
    reg: Registry = Registry("widget", "mmke.types")

    @reg.register("alpha", help="the first")
    class Alpha:
        pass

    assert reg.get("alpha") is Alpha
    assert reg.names() == ["alpha"]
    assert dict(reg.describe()) == {"alpha": "the first"}
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("alpha")(object)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownNameError) as err:
        benchmarks.get("wrld")
    msg = str(err.value)
    assert "unknown benchmark 'wrld'" in msg
    assert "did you mean 'world'" in msg


def test_builtin_benchmarks_are_discovered() -> None:
    assert {"world", "native"} <= set(benchmarks.names())
