"""config.yaml.example stays a working config that names every key of every plugin."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from threatbus import plugins

EXAMPLE = Path(__file__).parent.parent / "config.yaml.example"


def test_example_passes_check_as_is(tmp_path):
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLE, config)
    result = subprocess.run(
        [sys.executable, "-m", "threatbus", "check", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout


def test_example_documents_every_key_of_every_installed_plugin():
    text = EXAMPLE.read_text()
    sections = {}
    for kind in ("apps", "backbones"):
        for name, entry_point in plugins.installed(kind).items():
            for validator in entry_point.load()().config_validators():
                for key in validator.names:
                    prefix = f"plugins.{kind}.{name}"
                    if key != prefix:
                        sections.setdefault(name, set()).add(key[len(prefix) + 1 :].split(".")[-1])
    assert {"zmq", "rabbitmq"} <= sections.keys()
    for name, keys in sections.items():
        block = re.search(rf"^ *#? *{name}:.*?(?=^ *#? *\w+:\s+# threatbus-|\Z)", text, re.M | re.S)
        assert block, f"no section for plugin {name}"
        missing = sorted(key for key in keys if not re.search(rf"^ *#? *{key}:", block.group(0), re.M))
        assert not missing, f"config.yaml.example lacks keys of {name}: {missing}"
