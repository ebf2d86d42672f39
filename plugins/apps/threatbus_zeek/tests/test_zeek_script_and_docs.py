"""The shipped Zeek script and the README agree with the plugin.

Zeek cannot run here, so these tests check what can go out of step without
it: topics, module name, event signatures against the Broker types the
plugin sends and expects, the conditional blocks, the packaging of the
script, and the README's list of config keys.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from zeekclient import brokertypes

from threatbus.stix import new_indicator
from threatbus_zeek import INTEL_TOPIC, MATCH_TOPIC, ZeekApp, script_path
from threatbus_zeek.mapping import add_batch_event, to_zeek_intel

PLUGIN_DIR = Path(__file__).resolve().parents[1]
SCRIPT = script_path().read_text()

# Zeek types of event parameters -> the brokertypes class their values travel as.
ZEEK_TO_BROKER = {
    "string": brokertypes.String,
    "double": brokertypes.Real,
    "time": brokertypes.Timestamp,
    "count": brokertypes.Count,
    "Intel::Type": brokertypes.Enum,
    "table[string] of string": brokertypes.Table,
}


def declared_event(name: str) -> list[str]:
    """The parameter types of ``global <name>: event(...)`` in the script."""
    match = re.search(rf"global {name}: event\((.*?)\)(?: &is_used)?;", SCRIPT, re.S)
    assert match, f"event {name} is not declared in threatbus.zeek"
    params = [p.strip() for p in re.split(r",\s*(?![^\[]*\])", " ".join(match[1].split()))]
    return [param.split(":", 1)[1].strip() for param in params]


def test_script_is_in_the_package():
    assert script_path().is_file()
    assert (script_path().parent / "__load__.zeek").read_text().strip() == "@load ./threatbus"


def test_script_module_and_topics_match_the_plugin_defaults():
    assert re.search(r"^module ThreatBus;$", SCRIPT, re.M)
    assert f'const intel_topic = "{INTEL_TOPIC}" &redef;' in SCRIPT
    assert f'const match_topic = "{MATCH_TOPIC}" &redef;' in SCRIPT
    assert "const listen_port = 9997/tcp &redef;" in SCRIPT


def test_add_and_remove_events_take_what_the_plugin_sends():
    intel = to_zeek_intel(new_indicator("[ipv4-addr:value = '6.6.6.6']", name="x"))
    sent = brokertypes.ZeekEvent.from_broker(intel.event("ThreatBus"))
    assert [ZEEK_TO_BROKER[t] for t in declared_event("add_intel")] == [type(a) for a in sent.args]

    removal = to_zeek_intel(new_indicator("[ipv4-addr:value = '6.6.6.6']", x_threatbus_update="REMOVE"))
    sent = brokertypes.ZeekEvent.from_broker(removal.event("ThreatBus"))
    assert [ZEEK_TO_BROKER[t] for t in declared_event("remove_intel")] == [type(a) for a in sent.args]


def test_add_intels_takes_the_records_the_plugin_sends():
    items = [to_zeek_intel(new_indicator(f"[ipv4-addr:value = '6.6.6.{i}']", name="x")) for i in range(3)]
    sent = brokertypes.ZeekEvent.from_broker(add_batch_event(items, "ThreatBus"))
    assert declared_event("add_intels") == ["vector of IntelItem"]
    assert len(sent.args) == 1 and isinstance(sent.args[0], brokertypes.Vector)
    # A record travels as the vector of its fields, in the order the script declares them.
    fields = re.search(r"type IntelItem: record \{(.*?)\};", SCRIPT, re.S)
    assert fields, "record IntelItem is not declared in threatbus.zeek"
    types = [f.split(":", 1)[1].strip().rstrip(";") for f in fields[1].split(";") if f.strip()]
    for record, item in zip(sent.args[0], items, strict=True):
        assert [ZEEK_TO_BROKER[t] for t in types] == [type(v) for v in record]
        assert [v.to_py() for v in record][:1] == [item.indicator]


def test_script_parses_with_zeek_script():
    """zeekscript's tree-sitter grammar of Zeek finds no syntax error (Zeek itself cannot run here)."""
    command = Path(sys.executable).with_name("zeek-script")
    assert command.exists(), "zeek-script missing: pip install -e 'plugins/apps/threatbus_zeek[test]'"
    done = subprocess.run([str(command), "parse", str(script_path())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[error]" not in done.stdout


def test_intel_match_sends_what_the_plugin_reads():
    # mapping.sighting_from_match reads (ts: real, source, indicator, Intel::Type enum, table of strings).
    assert [ZEEK_TO_BROKER[t] for t in declared_event("intel_match")] == [
        brokertypes.Real,
        brokertypes.String,
        brokertypes.String,
        brokertypes.Enum,
        brokertypes.Table,
    ]
    assert (
        "event ThreatBus::add_intel(indicator: string, indicator_type: Intel::Type, source: string, desc: string)"
        in (" ".join(SCRIPT.split()))
    )


def test_script_blocks_are_balanced():
    opened = len(re.findall(r"^\s*@if(?:def|ndef)?\b", SCRIPT, re.M))
    assert opened == len(re.findall(r"^\s*@endif\b", SCRIPT, re.M))
    code = re.sub(r"#.*", "", re.sub(r'"(?:[^"\\]|\\.)*"', '""', SCRIPT))
    assert code.count("{") == code.count("}")
    assert code.count("(") == code.count(")")
    for version_switch in ("Cluster::listen_websocket", "Cluster::subscribe", "Cluster::publish"):
        assert f"@ifdef ( {version_switch} )" in SCRIPT


def test_readme_documents_every_config_key():
    readme = (PLUGIN_DIR / "README.md").read_text()
    names = [validator.names[0] for validator in ZeekApp().config_validators()]
    assert names, "no validators"
    for name in names:
        key = name.removeprefix("plugins.apps.zeek.")
        assert f"`{key}`" in readme, f"README.md does not document {key}"


def test_build_ships_the_zeek_script(tmp_path):
    """What setuptools copies into a build (and so into wheels) includes the scripts (package_data)."""
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=PLUGIN_DIR,
        check=True,
        capture_output=True,
        timeout=120,
    )
    scripts = tmp_path / "threatbus_zeek" / "scripts"
    assert (scripts / "threatbus.zeek").read_text() == SCRIPT
    assert (scripts / "__load__.zeek").is_file()
