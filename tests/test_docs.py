"""Every hook is documented: in its spec and in the plugin author's guide, with its parameters."""

import inspect
import re
from pathlib import Path

import pytest

from threatbus import appspecs, backbonespecs

GUIDE = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
SPECS = [(appspecs, "threatbus.app", "## App hooks"), (backbonespecs, "threatbus.backbone", "## Backbone hooks")]


def hooks(module, project):
    return [
        (name, fn)
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if getattr(fn, f"{project}_spec", None) is not None
    ]


def section(heading):
    return GUIDE.split(heading, 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize(("module", "project", "heading"), SPECS)
def test_every_hook_has_a_docstring_and_a_guide_entry(module, project, heading):
    found = hooks(module, project)
    assert found, f"no hookspecs found in {module.__name__}"
    for name, fn in found:
        assert inspect.getdoc(fn), f"hook {name} has no docstring"
        assert f"`{name}(" in section(heading), f"hook {name} is missing from docs/plugins.md ({heading})"


@pytest.mark.parametrize(("module", "project", "heading"), SPECS)
def test_the_guide_and_the_docstrings_name_each_hooks_parameters(module, project, heading):
    for name, fn in hooks(module, project):
        params = list(inspect.signature(fn).parameters)
        match = re.search(rf"`{name}\(([^)]*)\)`", section(heading))
        assert match, f"hook {name} is missing from docs/plugins.md ({heading})"
        documented = [p.strip() for p in match.group(1).split(",") if p.strip()]
        assert documented == params, f"docs/plugins.md shows {name}({', '.join(documented)}), the spec has {params}"
        if len(params) > 1:
            # A hook with more than one parameter documents each in its spec's docstring.
            missing = [p for p in params if f":param {p}:" not in inspect.getdoc(fn)]
            assert not missing, f"hook {name}: no ':param' for {missing} in its docstring"
