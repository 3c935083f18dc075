"""Everything ``purify`` says it exports imports from ``purify``, every registered purifier included, and ``dir``
lists it."""

from __future__ import annotations

import pytest

import purify
from purify.purifiers import PURIFIERS


@pytest.mark.parametrize("name", purify.__all__)
def test_every_name_in_all_imports(name):
    assert getattr(purify, name) is not None


@pytest.mark.parametrize("recipe_name", sorted(PURIFIERS))
def test_every_registered_purifier_and_config_is_exported(recipe_name):
    for obj in PURIFIERS[recipe_name]:
        assert obj.__name__ in purify.__all__, f"{obj.__name__} ({recipe_name}) is not in purify.__all__"
        assert getattr(purify, obj.__name__) is obj


def test_dir_lists_the_lazy_exports():
    listed = set(dir(purify))
    assert set(purify.__all__) <= listed, sorted(set(purify.__all__) - listed)


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        purify.no_such_name
