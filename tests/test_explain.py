"""``threatbus policy explain``: the verdict of every filter of a config for every object of a STIX file."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
import yaml

from threatbus.cli import main
from threatbus.testing import intel_mix, sighting

CONFIG = {
    "plugins": {
        "backbones": {
            "rabbitmq": {"export": {"filter": {"tlp": "amber"}}, "import": {"filter": {"min_confidence": 50}}}
        },
        "apps": {"zmq": {"filter": {"unmarked": "deny"}}, "zeek": {"filter": {"detection_only": True}}, "misp": None},
    }
}


@pytest.fixture
def files(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    mix = intel_mix()
    objects = [mix["red"].payload, mix["green"].payload, mix["clear"].payload, sighting(of=mix["red"]).payload]
    bundle = tmp_path / "bundle.json"
    identity = {"type": "identity", "id": "identity--1", "name": "x"}
    bundle.write_bytes(orjson.dumps({"type": "bundle", "id": "bundle--1", "objects": [identity, *objects]}))
    return config, bundle, mix


def blocks(text: str) -> dict[str, list[str]]:
    """The output per object id: its rule lines, whitespace collapsed."""
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  "):
            result[current].append(" ".join(line.split()))
        elif line.split(" ")[0].count("--") == 1:
            current = line.split(" ")[0]
            result[current] = []
    return result


def test_every_rule_says_whether_each_object_passes_and_why(files, capsys):
    config, bundle, mix = files
    code = main(["policy", "explain", "-c", str(config), str(bundle), "--client", 'sensor={"tlp": "clear"}'])
    out = capsys.readouterr().out
    assert code == 0
    got = blocks(out)
    # yaml.safe_dump sorts the apps: misp, zeek, zmq (then zmq's clients).
    assert got[mix["red"].id] == [
        "export rabbitmq HELD BACK: tlp: TLP:RED is above TLP:AMBER (stays on this node: its own apps still get it)",
        "import rabbitmq passes",
        "app misp passes (no filter)",
        "app zeek passes",
        "app zmq passes",
        "client zmq/sensor HELD BACK: tlp: TLP:RED is above TLP:CLEAR",
    ]
    assert got[mix["green"].id][:2] == [
        "export rabbitmq passes",
        "import rabbitmq HELD BACK: confidence: 30 is below 50",
    ]
    assert got[mix["green"].id][-1] == "client zmq/sensor HELD BACK: tlp: TLP:GREEN is above TLP:CLEAR"
    clear = got[mix["clear"].id]
    assert "client zmq/sensor passes" in clear
    assert "app zeek HELD BACK: detection: neither x_opencti_detection nor x_misp_to_ids is true" in clear
    sightings = [key for key in got if key.startswith("sighting--")]
    assert len(sightings) == 1 and got[sightings[0]][0].startswith("export rabbitmq HELD BACK: tlp: TLP:RED")
    assert "skipped (filters apply to indicators and sightings only): 1 identity" in out


def test_a_client_is_not_reached_when_its_app_holds_back(files, capsys, tmp_path):
    config, _bundle, mix = files
    lines = tmp_path / "intel.jsonl"
    lines.write_bytes(mix["unmarked"].encode() + b"\n\nnot json\n")
    assert main(["policy", "explain", "-c", str(config), str(lines), "--client", "s={}"]) == 0
    out = capsys.readouterr().out
    got = blocks(out)[mix["unmarked"].id]
    assert "app zmq HELD BACK: unmarked: no TLP marking and unmarked: deny" in got
    assert "client zmq/s not reached: its app holds it back" in got
    assert "line 3: skipped, not valid JSON" in out


def test_inmem_export_and_import_never_apply(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"plugins": {"backbones": {"inmem": {"export": {"filter": {"tlp": "clear"}}}}}}))
    intel = tmp_path / "one.json"
    intel.write_bytes(intel_mix()["red"].encode())
    assert main(["policy", "explain", "-c", str(config), str(intel)]) == 0
    assert "export inmem no other nodes: nothing leaves or arrives" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "section, key",
    [
        ({"apps": {"zmq": {"filter": {"tlp": "ultraviolet"}}}}, "plugins.apps.zmq.filter.tlp"),
        ({"backbones": {"rabbitmq": {"import": {"filter": {"labels": {"include": "x"}}}}}}, "import.filter.labels"),
    ],
)
def test_a_bad_filter_in_the_config_is_exit_2_naming_the_key(tmp_path, capsys, section, key):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"plugins": section}))
    intel = tmp_path / "one.json"
    intel.write_bytes(intel_mix()["red"].encode())
    assert main(["policy", "explain", "-c", str(config), str(intel)]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_bad_client_filters_and_missing_files_are_usage_errors(files, capsys, tmp_path):
    config, bundle, _mix = files
    with pytest.raises(SystemExit) as exit_info:
        main(["policy", "explain", "-c", str(config), str(bundle), "--client", 'x={"tlp": 5}'])
    assert exit_info.value.code == 2
    assert "client x: filter.tlp must be one of" in capsys.readouterr().err
    assert main(["policy", "explain", "-c", str(config), str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_real_command(files):
    config, bundle, _mix = files
    result = subprocess.run(
        [sys.executable, "-m", "threatbus", "policy", "explain", "-c", str(config), str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "export rabbitmq HELD BACK: tlp: TLP:RED" in " ".join(result.stdout.split())
    assert len(blocks(result.stdout)) == 4
