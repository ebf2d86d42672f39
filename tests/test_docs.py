"""Every hook is documented: in its spec and in the plugin author's guide."""

import inspect
from pathlib import Path

import pytest

from threatbus import appspecs, backbonespecs

GUIDE = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()


def hooks(module, project):
    return [
        (name, fn)
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if getattr(fn, f"{project}_spec", None) is not None
    ]


@pytest.mark.parametrize(
    ("module", "project", "heading"),
    [(appspecs, "threatbus.app", "## App hooks"), (backbonespecs, "threatbus.backbone", "## Backbone hooks")],
)
def test_every_hook_has_a_docstring_and_a_guide_entry(module, project, heading):
    found = hooks(module, project)
    assert found, f"no hookspecs found in {module.__name__}"
    section = GUIDE.split(heading, 1)[1].split("\n## ", 1)[0]
    for name, fn in found:
        assert inspect.getdoc(fn), f"hook {name} has no docstring"
        assert f"`{name}(" in section, f"hook {name} is missing from docs/plugins.md ({heading})"
