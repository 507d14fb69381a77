"""jsontext.dumps writes exactly the text of json.dumps(obj, indent=N)."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace import jsontext

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text())
keys = st.text() | st.integers() | st.floats(allow_nan=False) | st.booleans() | st.none()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.tuples(inner, inner)
                      | st.dictionaries(keys, inner, max_size=6), max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(values, st.integers(0, 4))
def test_same_text_as_json_dumps(obj, indent):
    assert jsontext.dumps(obj, indent=indent) == json.dumps(obj, indent=indent)


def test_fast_paths_and_odd_scalars():
    class Big(int):
        def __repr__(self):
            return "big"

    obj = {"ints": list(range(-3, 70)), "strs": ["a", "é\u2028", "\x00\"\\"], "mixed": [1, True, 1.5, None, "x"],
           "empty": [[], {}, ()], "f": [math.nan, math.inf, -math.inf, 1e16, -0.0, 1 / 3], 3: Big(7), None: [Big(2)],
           1.5: {"": {}}, True: False}
    for indent in (0, 1, 2, 4):
        assert jsontext.dumps(obj, indent=indent) == json.dumps(obj, indent=indent)


def test_what_json_cannot_hold_raises_type_error():
    for bad in ({"a": {1, 2}}, [object()], {(1, 2): 3}):
        with pytest.raises(TypeError):
            json.dumps(bad, indent=2)
        with pytest.raises(TypeError):
            jsontext.dumps(bad, indent=2)
