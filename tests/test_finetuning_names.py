"""ch06, ch07, appendix A and appendix E: every public name of the reference, same parameters and defaults."""

import importlib
import inspect

import pytest

from book_reference import reference

MODULES = {"ch06": 11, "ch07": 9, "appendix_a": 2, "appendix_e": 3}


def _public_members(module):
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__
            and (inspect.isfunction(obj) or inspect.isclass(obj))}


@pytest.mark.parametrize("chapter", sorted(MODULES))
def test_every_public_reference_name_exists_with_the_same_parameters(chapter):
    ref = reference(chapter)
    ours = importlib.import_module(f"gptfast.{chapter}")
    members = _public_members(ref)
    assert len(members) == MODULES[chapter], sorted(members)
    for name, ref_obj in members.items():
        assert hasattr(ours, name), f"gptfast.{chapter} lacks {name}"
        assert name in ours.__all__, f"{name} is not in gptfast.{chapter}.__all__"
        our_obj = getattr(ours, name)
        assert inspect.isclass(our_obj) == inspect.isclass(ref_obj), name
        ref_params = list(inspect.signature(ref_obj).parameters.values())
        our_params = list(inspect.signature(our_obj).parameters.values())
        # Same names, kinds and defaults, in order; extra trailing optional parameters are allowed.
        assert [(p.name, p.kind, p.default) for p in our_params[:len(ref_params)]] == \
               [(p.name, p.kind, p.default) for p in ref_params], f"{chapter}.{name} signature differs"
        assert all(p.default is not inspect.Parameter.empty for p in our_params[len(ref_params):]), name
        assert our_obj.__doc__, f"gptfast.{chapter}.{name} has no docstring"


@pytest.mark.parametrize("chapter", sorted(MODULES))
def test_the_chapter_modules_only_re_export(chapter):
    ours = importlib.import_module(f"gptfast.{chapter}")
    defined_here = [name for name in ours.__all__ if getattr(getattr(ours, name), "__module__", "") == ours.__name__]
    assert defined_here == []
