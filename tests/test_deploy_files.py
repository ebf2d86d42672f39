"""deploy/: the Dockerfile, the compose file with its node configs, and the systemd unit are valid."""

import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pika
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from testbus import RABBITMQ_HOST, RABBITMQ_PORT, require_rabbitmq

import threatbus_cluster as cluster
from threatbus import config
from threatbus.testing import ThreatBusProcess, free_port, indicator, unavailable, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "systemd" / "threatbus@.service"
NODES = ("threatbus-1", "threatbus-2", "threatbus-3")
CONTAINER_CONFIG = "/etc/threatbus/config.yaml"


def compose():
    return yaml.safe_load(COMPOSE.read_text())  # resolves the x-threatbus-node anchor


def node_config_path(service):
    mounts = [v for v in service["volumes"] if v.split(":")[1] == CONTAINER_CONFIG]
    assert len(mounts) == 1, service["volumes"]
    source, _, mode = mounts[0].split(":")
    assert mode == "ro"
    return (COMPOSE.parent / source).resolve()


def parse_unit(path):
    """systemd unit file -> {section: {key: [values]}} (keys may repeat, as systemd allows)."""
    sections = defaultdict(lambda: defaultdict(list))
    section = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        assert section is not None, f"{path}:{number}: key outside a section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"{path}:{number}: not key=value: {line}"
        sections[section][key.strip()].append(value.strip())
    return sections


# ---- Dockerfile -----------------------------------------------------------


def dockerfile_instructions():
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def test_the_image_installs_the_core_and_every_plugin_and_runs_unprivileged():
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    assert kinds.count("FROM") == 2  # build stage and a slim runtime stage
    copies = " ".join(arg for kind, arg in instructions if kind == "COPY")
    assert "threatbus ./threatbus" in copies and "plugins ./plugins" in copies
    install = next(arg for kind, arg in instructions if kind == "RUN" and "pip install" in arg)
    # every plugin directory of the repository is matched by the install globs
    for pattern in ("plugins/backbones/*/", "plugins/apps/*/"):
        assert pattern in install
    plugin_dirs = [p for p in ROOT.glob("plugins/*/*") if (p / "setup.py").exists()]
    assert {p.parent.name for p in plugin_dirs} <= {"backbones", "apps"}
    user = [arg for kind, arg in instructions if kind == "USER"]
    assert user and not user[-1].startswith(("root", "0"))
    assert [arg for kind, arg in instructions if kind == "ENTRYPOINT"] == ['["threatbus"]']
    assert [arg for kind, arg in instructions if kind == "CMD"] == [f'["-c", "{CONTAINER_CONFIG}"]']
    healthcheck = next(arg for kind, arg in instructions if kind == "HEALTHCHECK")
    assert "THREATBUS_HEALTHCHECK_URL" in healthcheck
    env = " ".join(arg for kind, arg in instructions if kind == "ENV")
    assert "THREATBUS_HEALTHCHECK_URL=http://127.0.0.1:13373/health" in env
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv*"} <= set(ignore)


# ---- compose --------------------------------------------------------------


def test_compose_has_rabbitmq_and_three_nodes_each_with_its_own_config():
    services = compose()["services"]
    assert set(services) == {"rabbitmq", *NODES}
    assert "healthcheck" in services["rabbitmq"]
    paths = set()
    for name in NODES:
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
        assert service["stop_signal"] == "SIGTERM"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        path = node_config_path(service)
        assert path.is_file() and path.is_relative_to(DEPLOY)
        paths.add(path)
    assert len(paths) == 3


def test_compose_publishes_distinct_host_ports_on_localhost_only():
    services = compose()["services"]
    published = []
    for name in NODES:
        for mapping in services[name]["ports"]:
            host, host_port, container_port = mapping.split(":")
            assert host == "127.0.0.1"
            published.append(int(host_port))
            assert 13370 <= int(container_port) <= 13373
    assert len(published) == len(set(published)) == 12


def test_node_configs_are_distinct_and_match_the_compose_file():
    services = compose()["services"]
    rabbitmq = services["rabbitmq"]["environment"]
    names, queues = set(), set()
    for name in NODES:
        settings, _ = config.load(node_config_path(services[name]))
        config.validate(settings, config.core_validators())
        names.add(settings.node.name)
        backbone = settings.plugins.backbones.rabbitmq
        queues.add(backbone.queue.name_suffix)
        assert backbone.host == "rabbitmq"
        assert (backbone.username, backbone.vhost) == (
            rabbitmq["RABBITMQ_DEFAULT_USER"],
            rabbitmq["RABBITMQ_DEFAULT_VHOST"],
        )
        assert "password" not in backbone  # from the environment:
        assert "THREATBUS_PLUGINS__BACKBONES__RABBITMQ__PASSWORD" in services[name]["environment"]
        # the image's HEALTHCHECK asks 127.0.0.1:13373; Prometheus reaches the node from outside
        assert (settings.http.host, settings.http.port) == ("0.0.0.0", 13373)
        container_ports = {int(m.split(":")[2]) for m in services[name]["ports"]}
        zmq = settings.plugins.apps.zmq
        assert container_ports == {zmq.manage, zmq.pub, zmq.sub, settings.http.port}
    assert names == set(NODES)
    assert len(queues) == 3  # nodes sharing a queue would split the messages


@pytest.mark.parametrize("name", NODES)
def test_node_configs_pass_threatbus_check_with_the_installed_plugins(name, monkeypatch):
    # as compose passes it: a numeric password must stay a string ("@str", see the compose file)
    value = compose()["services"][name]["environment"]["THREATBUS_PLUGINS__BACKBONES__RABBITMQ__PASSWORD"]
    assert value.startswith("@str ${THREATBUS_RABBITMQ_PASSWORD")
    monkeypatch.setenv("THREATBUS_PLUGINS__BACKBONES__RABBITMQ__PASSWORD", "@str 123456")
    path = node_config_path(compose()["services"][name])
    result = subprocess.run(
        [sys.executable, "-m", "threatbus", "check", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"config OK: node '{name}', backbone rabbitmq, apps zmq" in result.stdout


def test_a_numeric_password_from_the_environment_stays_a_string(monkeypatch):
    monkeypatch.setenv("THREATBUS_PLUGINS__BACKBONES__RABBITMQ__PASSWORD", "@str 123456")
    settings, _ = config.load(DEPLOY / "config" / "node-1.yaml")
    assert settings.plugins.backbones.rabbitmq.password == "123456"


def docker_compose_works():
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not docker_compose_works(), reason="the docker client has no compose plugin here")
def test_docker_compose_accepts_the_file():
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# ---- systemd --------------------------------------------------------------


def test_the_unit_is_hardened():
    service = parse_unit(UNIT)["Service"]

    def one(key):
        assert len(service[key]) == 1, f"{key}: {service[key]}"
        return service[key][0]

    assert one("DynamicUser") == "yes"
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectHome",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    assert one("SystemCallArchitectures") == "native"
    assert service["SystemCallFilter"][0] == "@system-service"


def test_the_unit_still_lets_the_bus_connect_listen_and_write_its_log():
    unit = parse_unit(UNIT)
    service = unit["Service"]
    families = service["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)  # broker, app ports, /metrics, journal
    assert not any(f.startswith("~") for f in families)
    assert service["ExecStart"] == ["/opt/threatbus/bin/threatbus -c /etc/threatbus/%i.yaml"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["RestartPreventExitStatus"] == ["2"]  # invalid config: no restart loop
    # writable despite ProtectSystem=strict: working directory and log directory
    assert service["StateDirectory"] == ["threatbus/%i"]
    assert service["WorkingDirectory"] == ["/var/lib/threatbus/%i"]
    assert service["LogsDirectory"] == ["threatbus"]
    assert service["ConfigurationDirectory"] == ["threatbus"]
    # no capabilities: every port the bus listens on by default is unprivileged
    assert all(port > 1023 for port in (13370, 13371, 13372, 13373))
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["Unit"]["After"][0]


systemd_analyze = shutil.which("systemd-analyze")


@pytest.mark.skipif(systemd_analyze is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit_and_rates_it_well(tmp_path):
    # verify needs the ExecStart binary to exist: point it at this environment's threatbus
    executable = Path(sys.executable).parent / "threatbus"
    instance = tmp_path / "threatbus@site-a.service"
    instance.write_text(UNIT.read_text().replace("/opt/threatbus/bin/threatbus", str(executable)))
    verify = subprocess.run([systemd_analyze, "verify", str(instance)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert "Unknown key" not in verify.stderr and "Unknown lvalue" not in verify.stderr, verify.stderr
    security = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert exposure, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 2.0, security.stdout


# ---- the guide's RabbitMQ permissions, on the real broker ------------------


def rabbitmqctl(*args):
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)


# The permissions the guide gave before nodes had a dead-letter queue.
PERMISSIONS_BEFORE_DLQ = r"^threatbus(\.durable|\.node-1)?$"


@pytest.fixture
def site_user(request):
    """A vhost and user made with the guide's commands, with a unique node suffix; removed afterwards.

    Parametrised indirectly with "before-dlq", the user gets the permissions of earlier releases.
    """
    require_rabbitmq()
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed here (the broker runs elsewhere)")
    status = rabbitmqctl("status")
    if status.returncode != 0:
        first = (status.stderr or status.stdout).strip().splitlines()[:1]
        unavailable(f"rabbitmqctl cannot manage the broker from here: {first}")
    guide = (DEPLOY / "README.md").read_text()
    command = re.search(r"rabbitmqctl set_permissions -p (\S+) (\S+) \\\n\s*'([^']+)' '([^']+)' '([^']+)'", guide)
    assert command, "the guide's set_permissions command is not where this test expects it"
    vhost, user, *regexes = command.groups()
    assert (vhost, user) == ("threatbus-site-a", "site-a-node-1")
    assert len(set(regexes)) == 1  # configure, write, read
    run_id = uuid.uuid4().hex[:8]
    names = {
        "vhost": f"{vhost}-{run_id}",
        "user": f"{user}-{run_id}",
        "password": uuid.uuid4().hex,
        "suffix": f"node-{run_id}",
    }
    if getattr(request, "param", "guide") == "before-dlq":
        regexes = [PERMISSIONS_BEFORE_DLQ]
    regex = regexes[0].replace(r"\.node-1", rf"\.{names['suffix']}")
    assert rabbitmqctl("add_vhost", names["vhost"]).returncode == 0
    try:
        assert rabbitmqctl("add_user", names["user"], names["password"]).returncode == 0
        granted = rabbitmqctl("set_permissions", "-p", names["vhost"], names["user"], regex, regex, regex)
        assert granted.returncode == 0, granted.stderr
        yield names
    finally:
        # Retried: another test may be restarting the broker right now.
        for what, name in (("user", names["user"]), ("vhost", names["vhost"])):
            wait_until(
                lambda what=what, name=name: removed(rabbitmqctl(f"delete_{what}", name)),
                60,
                interval=1,
                what=f"rabbitmqctl delete_{what} {name}",
            )


def removed(result):
    return result.returncode == 0 or "does not exist" in result.stdout + result.stderr


def site_node(site_user, tmp_path, port):
    return ThreatBusProcess(
        {
            "node": {"name": "site-a-node"},
            "http": {"port": port},
            "plugins": {
                "backbones": {
                    "rabbitmq": {
                        "host": RABBITMQ_HOST,
                        "port": RABBITMQ_PORT,
                        "username": site_user["user"],
                        "password": site_user["password"],
                        "vhost": site_user["vhost"],
                        "queue": {"name_suffix": site_user["suffix"]},
                        # No app on purpose: consume at once instead of holding for a subscriber.
                        "wait_for_subscribers": 0,
                    }
                }
            },
        },
        tmp_path,
    ).start()


@pytest.mark.rabbitmq
@pytest.mark.e2e
def test_the_guides_permissions_let_a_node_run_and_nothing_more(site_user, tmp_path):
    port = free_port()
    node = site_node(site_user, tmp_path, port)
    parameters = site_parameters(site_user)
    try:
        # declared, bound and consuming (health needs both connections up)
        wait_until(lambda: cluster.health(port)[0], 20, what="the node to connect with the site user")
        # the user may publish intel to the exchange the backbone publishes to; the node consumes it
        publish_as(parameters, indicator("10.8.0.1").encode()).close()
        wait_until(lambda: consumed(port) == 1, 10, what="the node to consume the message")
        # poison goes to the node's own dead-letter queue, which the user may read
        connection = publish_as(parameters, b"not json")
        channel = connection.channel()
        wait_until(
            lambda: channel.queue_declare(f"threatbus.{site_user['suffix']}.dlq", passive=True).method.message_count,
            10,
            what="the poison in the dead-letter queue",
        )
        connection.close()
        # and nothing else: another exchange, another node's queue
        for declare in (
            lambda ch: ch.exchange_declare("other", "fanout"),
            lambda ch: ch.queue_declare("threatbus.some-other-node"),
        ):
            connection = pika.BlockingConnection(parameters)
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
                declare(connection.channel())
            connection.close()
        assert "ACCESS_REFUSED" not in node.log()
    finally:
        assert node.stop() == 0


@pytest.mark.rabbitmq
@pytest.mark.e2e
@pytest.mark.parametrize("site_user", ["before-dlq"], indirect=True)
def test_a_user_with_the_permissions_of_earlier_releases_still_runs_the_node(site_user, tmp_path):
    port = free_port()
    node = site_node(site_user, tmp_path, port)
    try:
        wait_until(lambda: cluster.health(port)[0], 20, what="the node to connect without the DLQ permissions")
        publish_as(site_parameters(site_user), b"not json", indicator("10.8.0.2").encode()).close()
        wait_until(lambda: consumed(port) == 2, 10, what="the node to consume both")
        assert cluster.health(port)[0]
        refused = [line for line in node.log().splitlines() if "dead-letter queue" in line and "refused" in line]
        assert len(refused) == 1 and "ACCESS_REFUSED" in refused[0], node.log()
    finally:
        assert node.stop() == 0


def site_parameters(site_user):
    """How the site user of the deployment guide connects to RabbitMQ."""
    credentials = pika.PlainCredentials(site_user["user"], site_user["password"])
    return pika.ConnectionParameters(
        RABBITMQ_HOST, RABBITMQ_PORT, virtual_host=site_user["vhost"], credentials=credentials
    )


def publish_as(parameters, *bodies):
    """Publish ``bodies`` to the backbone's exchange with confirms; returns the open connection."""
    connection = pika.BlockingConnection(parameters)
    channel = connection.channel()
    channel.confirm_delivery()
    for body in bodies:
        channel.basic_publish("threatbus.durable", "", body)
    return connection


def consumed(port):
    """threatbus_backbone_consumed_total of the node whose /metrics is on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return sum(s.value for f in families for s in f.samples if s.name == "threatbus_backbone_consumed_total")
