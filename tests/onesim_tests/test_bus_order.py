"""The order of a call's API event and the state events it caused: oned
triggers the state event first, one_hm.rb's publishing threads may swap
them (EVENT IMAGE n/DELETE/ and EVENT API one.image.delete 1)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.onesim import Simulator
from tests.onesim.testing import create_datablock


def delete_keys(one: Any, onesim: Simulator) -> list[str]:
    iid = create_datablock(one, f"d{id(one)}", 1)
    before = len(onesim.published())
    one.image.delete(iid)
    onesim.wait_idle()
    return [k for k, _ in onesim.published()[before:]
            if k.startswith((f"EVENT IMAGE {iid}/", "EVENT API one.image.delete"))]


@pytest.mark.parametrize("order, expected", [
    ("after", ["EVENT IMAGE {}/DELETE/ ", "EVENT API one.image.delete 1"]),   # as captured
    ("before", ["EVENT API one.image.delete 1", "EVENT IMAGE {}/DELETE/ "]),
])
def test_image_delete_events_in_either_order(one: Any, onesim: Simulator, order: str,
                                             expected: list[str]) -> None:
    onesim.bus.api_order["one.image.delete"] = order
    keys = delete_keys(one, onesim)
    iid = int(keys[0].split()[2].split("/")[0]) if keys[0].startswith("EVENT IMAGE") \
        else int(keys[1].split()[2].split("/")[0])
    assert keys == [k.format(iid) for k in expected]


def test_random_order_shows_both(one: Any, onesim: Simulator) -> None:
    onesim.bus.api_order["one.image.delete"] = "random"
    firsts = {delete_keys(one, onesim)[0].split()[1] for _ in range(20)}
    assert firsts == {"IMAGE", "API"}
