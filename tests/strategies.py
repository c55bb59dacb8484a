"""Hypothesis strategies shared by the codec property tests."""

from __future__ import annotations

from hypothesis import strategies as st

_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=6)
    | st.binary(max_size=40)
    | st.floats()
)

#: Any small msgpack value, nil and floats included: what a hostile signer could put in a field.
any_values = st.recursive(
    _leaf,
    lambda i: st.lists(i, max_size=3) | st.dictionaries(st.text(max_size=5), i, max_size=3),
    max_leaves=10,
)
