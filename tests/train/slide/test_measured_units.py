"""A model's units name the target kind its measured spots are compared in."""
from __future__ import annotations

import pytest

from brst.handlers.errors import BrstError
from brst.handlers.targets import KINDS
from brst.train.slide.measured import kind_of_units


def test_each_kinds_units_name_it_and_other_units_are_a_clear_error():
    assert {kind_of_units(kind.units): name for name, kind in KINDS.items()} == {name: name for name in KINDS}
    assert kind_of_units("log1p(count per 10k)") == "lognorm"
    with pytest.raises(BrstError, match=r"model units: unknown units 'tpm'; expected one of log1p\(count\), "
                                        r"log1p\(count per 10k\)"):
        kind_of_units("tpm")
