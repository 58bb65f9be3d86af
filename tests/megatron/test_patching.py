"""The Megatron adapter's patching room: a PatchSet applies and undoes as a whole, by-name imports included."""

from __future__ import annotations

import sys
import types

import pytest

from dualpipe_plugin.megatron.patching import Patch, PatchSet, everywhere


@pytest.fixture
def modules(monkeypatch):
    home = types.ModuleType("megatron.fake_home")
    home.f = lambda: "original"
    user = types.ModuleType("megatron.fake_user")
    user.f = home.f  # `from megatron.fake_home import f`
    stranger = types.ModuleType("other.fake")
    stranger.f = home.f
    for module in (home, user, stranger):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return home, user, stranger


def test_everywhere_rebinds_by_name_imports_within_the_prefixes(modules) -> None:
    home, user, stranger = modules
    original = home.f
    patches = PatchSet()
    patches.apply(everywhere(home, "f", lambda old: (lambda: "patched " + old()), "test"))
    assert home.f() == user.f() == "patched original" and stranger.f is original
    assert {p.target for p in patches.applied} == {"megatron.fake_home.f", "megatron.fake_user.f"}
    patches.undo()
    assert home.f is user.f is original and not patches


def test_a_failing_patch_undoes_the_whole_set() -> None:
    class Owner:
        value = 1

    class Frozen:
        __slots__ = ()

    patches = PatchSet()
    with pytest.raises(AttributeError):
        patches.apply([Patch(Owner, "value", 2), Patch(Owner, "added", 3), Patch(Frozen(), "nope", 4)])
    assert Owner.value == 1 and not hasattr(Owner, "added") and not patches
