"""The one registry helper: register by decorator or call, look up with a one-line error, list names."""
from __future__ import annotations

import pickle

import pytest

from brst.handlers.errors import BrstError
from brst.handlers.registry import Registry, UnknownName


def test_register_by_decorator_and_by_call_keeps_order_and_returns_the_entry():
    colours = Registry("colour")

    @colours.register("red")
    def red() -> str:
        return "#f00"

    assert red() == "#f00"
    assert colours.register("blue", "#00f") == "#00f"
    assert colours.names() == ["red", "blue"]
    assert colours["red"] is red and colours.get("blue") == "#00f"
    assert "red" in colours and "green" not in colours
    assert list(colours) == ["red", "blue"] and len(colours) == 2
    assert colours.items() == [("red", red), ("blue", "#00f")]


def test_unknown_name_is_a_one_line_error_naming_it_and_the_known_ones():
    colours = Registry("colour")
    colours.register("red", 1)
    colours.register("blue", 2)
    with pytest.raises(UnknownName) as caught:
        colours["green"]
    assert str(caught.value) == "colour: unknown colour 'green'; choose one of red, blue"
    assert isinstance(caught.value, BrstError) and isinstance(caught.value, LookupError)
    with pytest.raises(BrstError, match=r"^--colour green: unknown colour 'green'"):
        colours.get("green", subject="--colour green")
    again = pickle.loads(pickle.dumps(caught.value))
    assert type(again) is UnknownName and str(again) == str(caught.value)


def test_a_name_registered_twice_is_refused():
    colours = Registry("colour")
    colours.register("red", 1)
    with pytest.raises(ValueError, match="colour 'red' is registered twice"):
        colours.register("red", 2)
    assert colours["red"] == 1
