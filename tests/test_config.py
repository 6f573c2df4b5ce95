"""Configuration: defaults, TOML and environment loading, precedence, export, and rejection of
every invalid value with the setting named as the user wrote it."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sovereign_discovery import ArgumentTypeError, ArgumentValueError, Identity, SovereignDiscoveryError
from sovereign_discovery.addresses import Address
from sovereign_discovery.aio import DhtNode
from sovereign_discovery.config import (
    CONFIG_FILE_ENV,
    DEFAULT_SERVICE_NAME,
    BootstrapConfig,
    Config,
    ConfigError,
    ConfigTypeError,
    DhtSettings,
    HostPort,
    LocalConfig,
    NodeConfig,
    all_settings,
    env_var_name,
)
from sovereign_discovery.constants import DEFAULT_BUCKET_SIZE, DEFAULT_PARALLELISM, MAX_BUCKET_SIZE
from sovereign_discovery.identity import encode_public_key
from sovereign_discovery.node import DhtConfig
from sovereign_discovery.routing import Contact

KEYS = [encode_public_key(Identity.from_seed(bytes([i]) * 32).public_key) for i in range(1, 5)]
PEER_A = f"{KEYS[0]}@192.0.2.1:4000"
PEER_B = f"{KEYS[1]}@[2001:db8::7]:4001"
PEER_C = f"{KEYS[2]}@198.51.100.9:4002"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def rejects(load, setting: str, shown: str | None = None, cls: type = ConfigError) -> ConfigError:
    """Run ``load``; it must raise ``cls`` whose message names ``setting`` and shows ``shown``."""
    with pytest.raises(cls) as info:
        load()
    err = info.value
    message = str(err)
    assert "\n" not in message
    assert setting in message, message
    assert err.setting == setting, (err.setting, message)
    if shown is not None:
        assert shown in message, message
    return err


# --- defaults ------------------------------------------------------------------------------------


def test_defaults():
    config = Config()
    assert config.node == NodeConfig(key_file=None, cache_file=None, http=None, log_level="INFO")
    assert config.bootstrap.enabled is True and config.bootstrap.peers == ()
    assert config.bootstrap.fallback_peers == ()
    assert config.bootstrap.timeout_s == 5.0 and config.bootstrap.retries == 5
    assert config.local.mdns is True and config.local.bluetooth is True
    assert config.local.service_name == DEFAULT_SERVICE_NAME == "_sovereign._tcp.local."
    assert config.local.mdns_interfaces == () and config.local.ble_adapter is None
    assert config.local.rotating_token is False
    assert config.dht.k == DEFAULT_BUCKET_SIZE and config.dht.alpha == DEFAULT_PARALLELISM
    assert config.dht.record_ttl_s == 3600.0
    assert config.dht.listen_host == ("127.0.0.1",) and config.dht.listen_port == 0
    assert config.dht.advertised_address is None
    # Every source with nothing in it gives the defaults.
    assert Config.from_toml("") == Config.from_env({}) == Config.load(environ={}) == config
    assert Config.from_dict({}) == config


def test_defaults_match_the_engine_defaults():
    assert DhtSettings().to_dht_config() == DhtConfig(lookup_deadline_s=DhtSettings().lookup_timeout_s)
    assert DhtSettings().to_dht_config().bucket_size == DhtConfig().bucket_size


def test_to_dht_config_maps_the_settings():
    dht = DhtSettings(k=8, alpha=2, record_ttl_s=600, lookup_timeout_s=3, record_quorum=0)
    engine = dht.to_dht_config()
    assert (engine.bucket_size, engine.parallelism, engine.record_ttl_s, engine.lookup_deadline_s,
            engine.record_quorum) == (8, 2, 600.0, 3.0, 0)
    base = DhtConfig(max_lookups=7, bucket_size=30)
    engine = dht.to_dht_config(base)
    assert engine.max_lookups == 7 and engine.bucket_size == 8
    with pytest.raises(ArgumentTypeError, match="base"):
        dht.to_dht_config("nope")


def test_dht_node_kwargs_construct_a_node():
    dht = DhtSettings(listen_host=["0.0.0.0", "::"], listen_port=4000, advertised_address="203.0.113.5:4000")
    kwargs = dht.dht_node_kwargs()
    assert kwargs["host"] == ("0.0.0.0", "::") and kwargs["port"] == 4000
    assert kwargs["advertised_address"] == Address("203.0.113.5", 4000)
    node = DhtNode(Identity.from_seed(bytes(32)), **kwargs)  # validated by DhtNode, not started
    assert not node.closed
    assert DhtSettings(listen_host="::1").dht_node_kwargs()["host"] == "::1"


def test_sections_are_frozen_and_normalised(monkeypatch):
    monkeypatch.setenv("HOME", "/home/tester")
    bootstrap = BootstrapConfig(peers=[PEER_A, Contact.parse(PEER_B)], timeout_s=2)
    assert bootstrap.peers == (Contact.parse(PEER_A), Contact.parse(PEER_B))
    assert isinstance(bootstrap.timeout_s, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bootstrap.timeout_s = 3.0  # type: ignore[misc]
    node = NodeConfig(key_file="~/node.key", http="8080", log_level="debug")
    assert node.key_file == Path("/home/tester/node.key")
    assert node.http == HostPort("127.0.0.1", 8080) and node.log_level == "DEBUG"
    assert DhtSettings(listen_host="0.0.0.0").listen_host == ("0.0.0.0",)
    assert hash(Config()) == hash(Config())


def test_code_construction_is_validated():
    rejects(lambda: DhtSettings(k=0), "dht.k", "0")
    rejects(lambda: DhtSettings(k="20"), "dht.k", "'20'", ConfigTypeError)
    rejects(lambda: LocalConfig(scan_interval_s=-1), "local.scan_interval_s", "-1")
    rejects(lambda: BootstrapConfig(peers=["nope"]), "bootstrap.peers", "'nope'")
    rejects(lambda: BootstrapConfig(backoff_initial_s=10, backoff_max_s=5), "bootstrap.backoff_max_s", "5")
    rejects(lambda: Config(dht=5), "dht", None, ConfigTypeError)


def test_error_classes():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, ArgumentValueError)
    assert issubclass(ConfigError, SovereignDiscoveryError)
    assert issubclass(ConfigTypeError, ConfigError) and issubclass(ConfigTypeError, TypeError)
    assert issubclass(ConfigTypeError, ArgumentTypeError)


# --- TOML ----------------------------------------------------------------------------------------

FULL_TOML = f"""
[node]
key_file = "/var/lib/sd/node.key"
cache_file = "/var/lib/sd/peers.sqlite"
http = "127.0.0.1:8080"
log_level = "debug"

[bootstrap]
enabled = true
peers = ["{PEER_A}", "{PEER_B}"]
fallback_peers = ["{PEER_C}"]
timeout_s = 2.5
retries = 3
backoff_initial_s = 0.5
backoff_max_s = 30
backoff_multiplier = 3.0
jitter = 0.25

[local]
mdns = false
bluetooth = false
scan_interval_s = 5
service_name = "_myapp._udp.local."
mdns_interfaces = ["192.168.1.10", "fe80::1%eth0"]
ble_adapter = "hci1"
rotating_token = true
token_rotation_s = 600

[dht]
k = 16
alpha = 4
record_ttl_s = 7200
lookup_timeout_s = 8
listen_host = ["0.0.0.0", "::"]
listen_port = 4000
advertised_address = "203.0.113.5:4000"
"""


def test_full_toml_file():
    config = Config.from_toml(FULL_TOML)
    assert config.node.key_file == Path("/var/lib/sd/node.key")
    assert config.node.http == HostPort("127.0.0.1", 8080) and config.node.log_level == "DEBUG"
    assert config.bootstrap.peers == (Contact.parse(PEER_A), Contact.parse(PEER_B))
    assert config.bootstrap.fallback_peers == (Contact.parse(PEER_C),)
    assert config.bootstrap.backoff_max_s == 30.0 and config.bootstrap.jitter == 0.25
    assert config.local.mdns is False and config.local.service_name == "_myapp._udp.local."
    assert config.local.mdns_interfaces == ("192.168.1.10", "fe80::1%eth0")
    assert config.local.ble_adapter == "hci1" and config.local.token_rotation_s == 600.0
    assert (config.dht.k, config.dht.alpha, config.dht.listen_port) == (16, 4, 4000)
    assert config.dht.listen_host == ("0.0.0.0", "::")
    assert config.dht.advertised_address == Address("203.0.113.5", 4000)


def test_toml_round_trip():
    config = Config.from_toml(FULL_TOML)
    text = config.to_toml()
    assert Config.from_toml(text) == config
    assert Config.from_dict(config.to_dict()) == config
    assert Config.from_toml(Config().to_toml()) == Config()
    # to_dict is JSON- and TOML-ready.
    exported = config.to_dict()
    assert exported["bootstrap"]["peers"] == [PEER_A, PEER_B]
    assert exported["node"]["key_file"] == "/var/lib/sd/node.key"
    assert Config().to_dict()["node"]["http"] is None
    assert set(exported) == {"node", "bootstrap", "local", "dht"}


def test_toml_string_escaping_round_trips(tmp_path):
    weird = Path("/tmp/a \"quoted\" \\ dir\t\x7f/ключ.key")
    config = Config(node=NodeConfig(key_file=weird))
    assert Config.from_toml(config.to_toml()).node.key_file == weird


def test_file_relative_paths_and_bom(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir()
    path = directory / "sd.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'[node]\nkey_file = "keys/node.key"\ncache_file = "/abs/c.db"\n')
    config = Config.from_file(path)
    assert config.node.key_file == directory / "keys" / "node.key"
    assert config.node.cache_file == Path("/abs/c.db")
    # A document without a file keeps relative paths relative (to the working directory).
    assert Config.from_toml('[node]\nkey_file = "k.key"').node.key_file == Path("k.key")


def test_listen_host_accepts_a_string_or_an_array():
    assert Config.from_toml('[dht]\nlisten_host = "::1"').dht.listen_host == ("::1",)
    assert Config.from_toml('[dht]\nlisten_host = ["::1", "127.0.0.1"]').dht.listen_host == ("::1", "127.0.0.1")


def test_empty_string_unsets_an_optional_setting():
    config = Config.from_toml('[node]\nhttp = ""\nkey_file = ""\n[local]\nble_adapter = ""')
    assert config.node.http is None and config.node.key_file is None and config.local.ble_adapter is None


# --- environment and precedence ----------------------------------------------------------------------


def test_env_variable_names():
    assert env_var_name("dht.k") == "SOVEREIGN_DHT_K"
    assert env_var_name("bootstrap.peers") == "SOVEREIGN_BOOTSTRAP_PEERS"
    assert [s.env_var for s in all_settings()] == [env_var_name(s.name) for s in all_settings()]


def test_env_sets_every_kind_of_setting():
    env = {
        "SOVEREIGN_BOOTSTRAP_PEERS": f" {PEER_A} , {PEER_B}",
        "SOVEREIGN_BOOTSTRAP_FALLBACK_PEERS": PEER_C,
        "SOVEREIGN_BOOTSTRAP_TIMEOUT_S": "1.5e0",
        "SOVEREIGN_BOOTSTRAP_RETRIES": "0",
        "SOVEREIGN_LOCAL_MDNS": "off",
        "SOVEREIGN_LOCAL_BLUETOOTH": "No",
        "SOVEREIGN_LOCAL_MDNS_INTERFACES": "10.0.0.1,10.0.0.2",
        "SOVEREIGN_LOCAL_BLE_ADAPTER": "hci0",
        "SOVEREIGN_DHT_K": "12",
        "SOVEREIGN_DHT_ALPHA": "+2",
        "SOVEREIGN_DHT_LISTEN_HOST": "0.0.0.0,::",
        "SOVEREIGN_DHT_LISTEN_PORT": "4000",
        "SOVEREIGN_NODE_KEY_FILE": "/k/node.key",
        "SOVEREIGN_NODE_HTTP": "[::1]:9000",
        "SOVEREIGN_NODE_LOG_LEVEL": "warning",
        # Not settings: ignored.
        "SOVEREIGN_DISCOVERY_PURE_PYTHON": "1",
        "SOVEREIGN_DISCOVERY_REQUIRE_C": "0",
        "PATH": "/bin",
    }
    config = Config.from_env(env)
    assert config.bootstrap.peers == (Contact.parse(PEER_A), Contact.parse(PEER_B))
    assert config.bootstrap.fallback_peers == (Contact.parse(PEER_C),)
    assert config.bootstrap.timeout_s == 1.5 and config.bootstrap.retries == 0
    assert config.local.mdns is False and config.local.bluetooth is False
    assert config.local.mdns_interfaces == ("10.0.0.1", "10.0.0.2") and config.local.ble_adapter == "hci0"
    assert (config.dht.k, config.dht.alpha) == (12, 2)
    assert config.dht.listen_host == ("0.0.0.0", "::") and config.dht.listen_port == 4000
    assert config.node.key_file == Path("/k/node.key") and config.node.http == HostPort("::1", 9000)
    assert config.node.log_level == "WARNING"


@pytest.mark.parametrize("text,value", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" On ", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("off", False),
])
def test_env_boolean_spellings(text, value):
    assert Config.from_env({"SOVEREIGN_BOOTSTRAP_ENABLED": text}).bootstrap.enabled is value


@pytest.mark.parametrize("text", ["2", "-1", "y", "n", "enabled", "truee", "1.0", "t"])
def test_env_boolean_rejects_other_spellings(text):
    rejects(lambda: Config.from_env({"SOVEREIGN_LOCAL_BLUETOOTH": text}), "SOVEREIGN_LOCAL_BLUETOOTH", repr(text))


def test_env_empty_list_and_optional():
    env = {"SOVEREIGN_BOOTSTRAP_PEERS": "", "SOVEREIGN_NODE_HTTP": "  "}
    base = Config(bootstrap=BootstrapConfig(peers=[PEER_A]), node=NodeConfig(http="1234"))
    config = base.with_overrides({"bootstrap.peers": "", "node.http": ""})
    assert config.bootstrap.peers == () and config.node.http is None
    assert Config.from_env(env) == Config()


def test_precedence_defaults_file_env_overrides(tmp_path):
    path = tmp_path / "sd.toml"
    path.write_text(f'[dht]\nk = 10\nalpha = 5\nrecord_ttl_s = 100\n[bootstrap]\npeers = ["{PEER_A}", "{PEER_B}"]\n')
    env = {"SOVEREIGN_DHT_K": "11", "SOVEREIGN_DHT_ALPHA": "6", "SOVEREIGN_BOOTSTRAP_PEERS": PEER_C}
    config = Config.load(path, environ=env, overrides={"dht.k": 12})
    assert config.dht.k == 12  # override > env > file
    assert config.dht.alpha == 6  # env > file
    assert config.dht.record_ttl_s == 100.0  # file > default
    assert config.dht.lookup_timeout_s == 10.0  # default
    assert config.bootstrap.peers == (Contact.parse(PEER_C),)  # a list is replaced, not merged
    assert Config.load(path, environ={}).dht.k == 10


def test_config_file_from_environment(tmp_path):
    named = tmp_path / "named.toml"
    named.write_text("[dht]\nk = 7\n")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[dht]\nk = 9\n")
    assert Config.load(environ={CONFIG_FILE_ENV: str(named)}).dht.k == 7
    assert Config.load(explicit, environ={CONFIG_FILE_ENV: str(named)}).dht.k == 9
    err = rejects(lambda: Config.load(environ={CONFIG_FILE_ENV: str(tmp_path / "missing.toml")}),
                  CONFIG_FILE_ENV, "missing.toml")
    assert "No such file" in str(err)


def test_load_reads_os_environ(monkeypatch):
    monkeypatch.setenv("SOVEREIGN_DHT_K", "13")
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    assert Config.load().dht.k == 13
    assert Config.from_env().dht.k == 13
    assert Config.load(environ={}).dht.k == DEFAULT_BUCKET_SIZE


def test_overrides_text_native_and_names():
    config = Config().with_overrides({"local.mdns": "off", "local.bluetooth": False, "dht.k": "8",
                                      "bootstrap.peers": [PEER_A, PEER_B], "node.http": "127.0.0.1:0"})
    assert config.local.mdns is False and config.local.bluetooth is False and config.dht.k == 8
    assert len(config.bootstrap.peers) == 2 and config.node.http == HostPort("127.0.0.1", 0)
    err = rejects(lambda: Config().with_overrides({"bootstrap.peers": [PEER_A, "x@1.2.3.4:5"]},
                                                  names={"bootstrap.peers": "--bootstrap"}),
                  "--bootstrap", "entry 2")
    assert err.source == "override" and err.value == "x@1.2.3.4:5"
    rejects(lambda: Config().with_overrides({"dht.k": 0}), "dht.k", "0")
    rejects(lambda: Config().with_overrides({"dht.kk": 3}), "dht.kk", "did you mean dht.k?")
    rejects(lambda: Config.load(environ={}, overrides={"dht.listen_port": "70000"},
                                override_names={"dht.listen_port": "--listen"}), "--listen", "70000")


def test_host_port_parse():
    assert HostPort.parse("0.0.0.0:80") == HostPort("0.0.0.0", 80)
    assert HostPort.parse("[::1]:0") == HostPort("::1", 0)
    assert HostPort.parse("localhost:8080") == HostPort("localhost", 8080)
    assert HostPort.parse("9100") == HostPort("127.0.0.1", 9100)
    assert str(HostPort("::1", 5)) == "[::1]:5" and HostPort("::1", 5).to_tuple() == ("::1", 5)
    for bad in ["::1:80", "host:", ":80", "host:65536", "[host]:80", "a b:80", "1.2.3.999:80", "h:-1",
                "[::1]80", "", "ħost:80", "host:٣"]:
        rejects(lambda bad=bad: HostPort.parse(bad, setting="--http"), "--http")


def test_backoff_delay():
    b = BootstrapConfig(backoff_initial_s=1, backoff_max_s=10, backoff_multiplier=2, jitter=0.5)
    assert [b.backoff_delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert b.backoff_delay(10**9) == 10  # no overflow
    rng = random.Random(7)
    delays = [b.backoff_delay(3, rng) for _ in range(200)]
    assert all(2.0 <= d <= 4.0 for d in delays) and len(set(delays)) > 100
    assert BootstrapConfig(backoff_multiplier=1, backoff_initial_s=3).backoff_delay(50) == 3
    with pytest.raises(ArgumentValueError):
        b.backoff_delay(0)
    with pytest.raises(ArgumentTypeError):
        b.backoff_delay(1.0)


# --- rejection: TOML -----------------------------------------------------------------------------

TOML_REJECTIONS = [
    # (document, setting named, text shown, error class)
    ("[dht]\nalhpa = 3", "dht.alhpa", "did you mean dht.alpha?", ConfigError),
    ("[dht]\nbucket_size = 3", "dht.bucket_size", "unknown setting", ConfigError),
    ("[bootstrap]\ntimeout = 3", "bootstrap.timeout", "did you mean bootstrap.timeout_s?", ConfigError),
    ("k = 3", "k", "did you mean dht.k?", ConfigError),
    ("[dhtt]\nk = 3", "dhtt", "did you mean [dht]?", ConfigError),
    ("[dht.extra]\nx = 1", "dht.extra", "unknown setting", ConfigError),
    ("dht = 5", "dht", "table", ConfigTypeError),
    ('[dht]\nk = "20"', "dht.k", "'20'", ConfigTypeError),
    ("[dht]\nk = 20.0", "dht.k", "20.0", ConfigTypeError),
    ("[dht]\nk = true", "dht.k", "True", ConfigTypeError),
    ("[dht]\nk = 0", "dht.k", "got 0", ConfigError),
    (f"[dht]\nk = {MAX_BUCKET_SIZE + 1}", "dht.k", str(MAX_BUCKET_SIZE + 1), ConfigError),
    ("[dht]\nalpha = 0", "dht.alpha", "got 0", ConfigError),
    ("[dht]\nalpha = -3", "dht.alpha", "-3", ConfigError),
    ("[dht]\nrecord_ttl_s = 0", "dht.record_ttl_s", "got 0", ConfigError),
    ("[dht]\nrecord_ttl_s = 9999999", "dht.record_ttl_s", "9999999", ConfigError),
    ("[dht]\nlookup_timeout_s = nan", "dht.lookup_timeout_s", "nan", ConfigError),
    ("[bootstrap]\ntimeout_s = 0", "bootstrap.timeout_s", "got 0", ConfigError),
    ("[bootstrap]\ntimeout_s = -1.5", "bootstrap.timeout_s", "-1.5", ConfigError),
    ("[bootstrap]\ntimeout_s = inf", "bootstrap.timeout_s", "inf", ConfigError),
    ("[bootstrap]\ntimeout_s = 1" + "0" * 400, "bootstrap.timeout_s", "must be", ConfigError),
    ('[bootstrap]\ntimeout_s = "5"', "bootstrap.timeout_s", "'5'", ConfigTypeError),
    ("[bootstrap]\nretries = -1", "bootstrap.retries", "-1", ConfigError),
    ("[bootstrap]\njitter = 1.5", "bootstrap.jitter", "1.5", ConfigError),
    ("[bootstrap]\nbackoff_multiplier = 0.5", "bootstrap.backoff_multiplier", "0.5", ConfigError),
    ("[bootstrap]\nbackoff_initial_s = 9\nbackoff_max_s = 3", "bootstrap.backoff_max_s",
     "bootstrap.backoff_initial_s", ConfigError),
    ('[bootstrap]\nenabled = "yes"', "bootstrap.enabled", "'yes'", ConfigTypeError),
    ("[bootstrap]\nenabled = 1", "bootstrap.enabled", "1", ConfigTypeError),
    (f'[bootstrap]\npeers = "{PEER_A}"', "bootstrap.peers", "array", ConfigTypeError),
    ("[bootstrap]\npeers = [1]", "bootstrap.peers", "entry 1", ConfigTypeError),
    ('[bootstrap]\npeers = ["192.0.2.1:4000"]', "bootstrap.peers", "'192.0.2.1:4000'", ConfigError),
    (f'[bootstrap]\npeers = ["{PEER_A}", "{KEYS[1][:-1]}@192.0.2.1:4000"]', "bootstrap.peers", "entry 2", ConfigError),
    (f'[bootstrap]\npeers = ["{KEYS[0]}@192.0.2.1:0"]', "bootstrap.peers", "port", ConfigError),
    (f'[bootstrap]\npeers = ["{KEYS[0]}@192.0.2.1:65536"]', "bootstrap.peers", "65536", ConfigError),
    (f'[bootstrap]\npeers = ["{KEYS[0]}@192.0.2.1"]', "bootstrap.peers", "entry 1", ConfigError),
    (f'[bootstrap]\npeers = ["{KEYS[0]}@boot.example.org:4000"]', "bootstrap.peers", "boot.example.org", ConfigError),
    (f'[bootstrap]\nfallback_peers = ["{KEYS[0]}@192.0.2.1:²"]', "bootstrap.fallback_peers", "entry 1", ConfigError),
    (f'[bootstrap]\nfallback_peers = ["{KEYS[0]}@2001:db8::1:4000"]', "bootstrap.fallback_peers", "entry 1", ConfigError),
    ('[local]\nservice_name = "_sovereign._tcp.local"', "local.service_name", "_sovereign._tcp.local", ConfigError),
    ('[local]\nservice_name = "sovereign._tcp.local."', "local.service_name", "sovereign", ConfigError),
    ('[local]\nservice_name = "_a-very-long-name16._tcp.local."', "local.service_name", "16", ConfigError),
    ('[local]\nservice_name = "_x._sctp.local."', "local.service_name", "sctp", ConfigError),
    ('[local]\nservice_name = ""', "local.service_name", "''", ConfigError),
    ("[local]\nscan_interval_s = 0", "local.scan_interval_s", "got 0", ConfigError),
    ("[local]\nmdns = 0", "local.mdns", "0", ConfigTypeError),
    ('[local]\nmdns_interfaces = ["eth0"]', "local.mdns_interfaces", "'eth0'", ConfigError),
    ('[local]\nmdns_interfaces = ["10.0.0.1", "10.0.0.1"]', "local.mdns_interfaces", "twice", ConfigError),
    ('[local]\nble_adapter = "hci 0"', "local.ble_adapter", "'hci 0'", ConfigError),
    ("[local]\ntoken_rotation_s = -5", "local.token_rotation_s", "-5", ConfigError),
    ("[dht]\nlisten_port = 65536", "dht.listen_port", "65536", ConfigError),
    ("[dht]\nlisten_port = -1", "dht.listen_port", "-1", ConfigError),
    ('[dht]\nlisten_host = "localhost"', "dht.listen_host", "localhost", ConfigError),
    ('[dht]\nlisten_host = ["127.0.0.1", "10.0.0.1"]', "dht.listen_host", "one address per family", ConfigError),
    ('[dht]\nlisten_host = ["224.0.0.251"]', "dht.listen_host", "multicast", ConfigError),
    ("[dht]\nlisten_host = []", "dht.listen_host", "at least one", ConfigError),
    ('[dht]\nadvertised_address = "0.0.0.0:4000"', "dht.advertised_address", "0.0.0.0:4000", ConfigError),
    ('[dht]\nadvertised_address = "203.0.113.5"', "dht.advertised_address", "203.0.113.5", ConfigError),
    ('[node]\nhttp = "127.0.0.1:99999"', "node.http", "99999", ConfigError),
    ('[node]\nhttp = "::1:80"', "node.http", "::1:80", ConfigError),
    ("[node]\nhttp = 8080", "node.http", "8080", ConfigTypeError),
    ('[node]\nlog_level = "verbose"', "node.log_level", "'verbose'", ConfigError),
    ('[node]\nlog_level = "ınfo"', "node.log_level", "ınfo", ConfigError),
    ("[node]\nkey_file = 5", "node.key_file", "5", ConfigTypeError),
    ('[node]\nkey_file = "a\\u0000b"', "node.key_file", "NUL", ConfigError),
]


@pytest.mark.parametrize("document,setting,shown,cls", TOML_REJECTIONS,
                         ids=[f"{i}-{case[1]}" for i, case in enumerate(TOML_REJECTIONS)])
def test_toml_rejections_name_the_setting(document, setting, shown, cls):
    err = rejects(lambda: Config.from_toml(document, source="sd.toml"), setting, shown, cls)
    assert str(err).startswith(f"sd.toml: {setting}: ")
    assert err.source == "sd.toml"


@pytest.mark.parametrize("document,line,column", [
    ("[dht]\nk = 3\nalpha = = 2\n", 3, 9),
    ("[dht]\nk = 1\n[dht]\n", 3, 5),
    ("[dht]\nk = 1\nk = 2\n", 3, 6),
    ("[dht\n", 1, 5),
    ("[dht]\nk = ", 2, 5),
    ("[bootstrap]\npeers = [\"a\",\n", 3, 1),
])
def test_bad_toml_syntax_gives_line_and_column(document, line, column):
    with pytest.raises(ConfigError) as info:
        Config.from_toml(document, source="sd.toml")
    err = info.value
    assert (err.line, err.column) == (line, column)
    assert str(err).startswith(f"sd.toml: invalid TOML at line {line}, column {column}: ")
    assert "\n" not in str(err)


def test_toml_that_python_cannot_even_parse():
    with pytest.raises(ConfigError, match="invalid TOML"):
        Config.from_toml("[dht]\nk = " + "9" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        Config.from_toml("x = " + "[" * 5000)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration file .*No such file") as info:
        Config.from_file(tmp_path / "missing.toml")
    assert info.value.source == str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        Config.from_file(tmp_path)  # a directory
    binary = tmp_path / "bad.toml"
    binary.write_bytes(b"[dht]\nk = 3\n\xff\xfe")
    with pytest.raises(ConfigError, match=r"bad.toml: not UTF-8 text \(line 3") as info:
        Config.from_file(binary)
    assert info.value.line == 3
    with pytest.raises(ConfigError, match="cannot read"):
        Config.from_file("a\x00b")
    bad_value = tmp_path / "v.toml"
    bad_value.write_text("[dht]\nk = 999\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad_value}: dht.k: must be in 1..255, got 999")):
        Config.load(bad_value, environ={})


# --- rejection: environment --------------------------------------------------------------------------

ENV_REJECTIONS = [
    ("SOVEREIGN_DHT_K", "0", "'0'"),
    ("SOVEREIGN_DHT_K", "256", "'256'"),
    ("SOVEREIGN_DHT_K", "20.0", "'20.0'"),
    ("SOVEREIGN_DHT_K", "twenty", "'twenty'"),
    ("SOVEREIGN_DHT_K", "1_0", "'1_0'"),
    ("SOVEREIGN_DHT_K", "٣", "'٣'"),
    ("SOVEREIGN_DHT_K", "9" * 5000, "must be in"),
    ("SOVEREIGN_DHT_K", "", "empty"),
    ("SOVEREIGN_DHT_ALPHA", "0", "'0'"),
    ("SOVEREIGN_DHT_RECORD_TTL_S", "5", "'5'"),
    ("SOVEREIGN_DHT_LISTEN_PORT", "65536", "'65536'"),
    ("SOVEREIGN_DHT_LISTEN_PORT", "-1", "'-1'"),
    ("SOVEREIGN_DHT_LISTEN_HOST", "127.0.0.1,,::1", "entry 2"),
    ("SOVEREIGN_DHT_LOOKUP_TIMEOUT_S", "nan", "'nan'"),
    ("SOVEREIGN_BOOTSTRAP_TIMEOUT_S", "0", "'0'"),
    ("SOVEREIGN_BOOTSTRAP_TIMEOUT_S", "-2", "'-2'"),
    ("SOVEREIGN_BOOTSTRAP_TIMEOUT_S", "inf", "'inf'"),
    ("SOVEREIGN_BOOTSTRAP_TIMEOUT_S", "1e999", "finite"),
    ("SOVEREIGN_BOOTSTRAP_TIMEOUT_S", "5s", "'5s'"),
    ("SOVEREIGN_BOOTSTRAP_BACKOFF_MAX_S", "0.1", "SOVEREIGN_BOOTSTRAP_BACKOFF_MAX_S"),
    ("SOVEREIGN_BOOTSTRAP_PEERS", f"{PEER_A},garbage", "entry 2"),
    ("SOVEREIGN_BOOTSTRAP_PEERS", f"{PEER_A};{PEER_B}", "entry 1"),
    ("SOVEREIGN_BOOTSTRAP_PEERS", f"{PEER_A},", "entry 2"),
    ("SOVEREIGN_BOOTSTRAP_ENABLED", "maybe", "'maybe'"),
    ("SOVEREIGN_LOCAL_SERVICE_NAME", "_x._tcp", "'_x._tcp'"),
    ("SOVEREIGN_LOCAL_MDNS_INTERFACES", "eth0", "'eth0'"),
    ("SOVEREIGN_NODE_LOG_LEVEL", "loud", "'loud'"),
    ("SOVEREIGN_NODE_HTTP", "host:port", "'host:port'"),
    ("SOVEREIGN_NODE_KEY_FILE", "/a\udcffb", "surrogate"),
    ("SOVEREIGN_DHT_ALPA", "3", "did you mean SOVEREIGN_DHT_ALPHA?"),
    ("SOVEREIGN_BOOTSTRAP_PEER", PEER_A, "did you mean SOVEREIGN_BOOTSTRAP_PEERS?"),
    ("SOVEREIGN_NODE_", "x", "unknown setting"),
]


@pytest.mark.parametrize("name,value,shown", ENV_REJECTIONS,
                         ids=[f"{i}-{case[0]}" for i, case in enumerate(ENV_REJECTIONS)])
def test_env_rejections_name_the_variable(name, value, shown):
    err = rejects(lambda: Config.from_env({name: value}), name, shown)
    assert str(err).startswith(f"{name}: ")
    assert err.source == "environment"


def test_env_cross_check_names_the_variable_that_won():
    env = {"SOVEREIGN_BOOTSTRAP_BACKOFF_MAX_S": "2"}
    err = rejects(lambda: Config.load(environ=env, overrides={"bootstrap.backoff_initial_s": 5}),
                  "SOVEREIGN_BOOTSTRAP_BACKOFF_MAX_S", "bootstrap.backoff_initial_s (5)")
    assert err.value == 2.0


# --- documentation -------------------------------------------------------------------------------


def test_every_setting_is_documented():
    text = DOCS.read_text(encoding="utf-8")
    for setting in all_settings():
        key = setting.name.rpartition(".")[2]
        assert f"`{setting.env_var}`" in text, setting.env_var
        assert re.search(rf"^\| `{re.escape(key)}` \|", text, re.M), setting.name


def test_the_documented_example_file_loads():
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks, "docs/configuration.md has no ```toml example"
    for block in blocks:
        Config.from_toml(block, source="docs/configuration.md")
    full = max(blocks, key=len)
    assert all(f"[{section}]" in full for section in ("node", "bootstrap", "local", "dht"))
    # The full example sets every setting.
    data = Config.from_toml(full).to_dict()
    written = tomllib.loads(full)
    assert {s: set(v) for s, v in written.items()} == {s: set(v) for s, v in data.items()}


# --- properties ----------------------------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=()), max_size=60)
_NAMES = [s.name for s in all_settings()]
_SECTION_NAMES = ["node", "bootstrap", "local", "dht", "nod", "DHT", "dht.x", "", "a b", '"x\\ny"', '"\\u0000"']
_KEYS = sorted({n.rpartition(".")[2] for n in _NAMES}) + ["x", "k ", "peerss", "\"q\"", '"a\\nb"', '"' + "z" * 300 + '"']
_LITERALS = st.one_of(
    st.sampled_from(["0", "-1", "1", "20", "65536", "3.5", "-0.0", "1e309", "nan", "inf", "-inf",
                     "true", "false", '""', '"x"', "[]", '["a"]', "[1, 2]", "{}", "{a = 1}",
                     "1979-05-27T07:32:00Z", "07:32:00", f'"{PEER_A}"', f'["{PEER_A}", "{PEER_B}"]',
                     '"0.0.0.0"', '["::", "0.0.0.0"]', '"127.0.0.1:0"', '"_a._udp.local."', "0x10",
                     "'lit'", '"""multi\nline"""']),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).replace("inf", "inf")),
    any_text.map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    any_text,
)


@st.composite
def toml_documents(draw):
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            lines.append(f"[{draw(st.sampled_from(_SECTION_NAMES))}]")
        lines.append(f"{draw(st.sampled_from(_KEYS))} = {draw(_LITERALS)}")
    return "\n".join(lines)


def _only_config_errors(load):
    try:
        config = load()
    except ConfigError as err:
        message = str(err)
        assert message and "\n" not in message and len(message) < 500, message
    else:
        assert isinstance(config, Config)
        assert Config.from_toml(config.to_toml()) == config  # whatever loads also round-trips


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_arbitrary_text_raises_only_config_errors(text):
    _only_config_errors(lambda: Config.from_toml(text))


@settings(max_examples=400, deadline=None)
@given(toml_documents())
def test_toml_ish_documents_raise_only_config_errors(document):
    _only_config_errors(lambda: Config.from_toml(document))


_ENV_NAMES = [s.env_var for s in all_settings()] + ["SOVEREIGN_DHT_X", "SOVEREIGN_LOCAL", "SOVEREIGN_DISCOVERY_PURE_PYTHON"]
_ENV_VALUES = st.one_of(any_text, st.sampled_from(["1", "0", "on", "", " ", "20", "0.5", "-1", "1e999", PEER_A,
                                                    f"{PEER_A},{PEER_B}", "0.0.0.0,::", "127.0.0.1:80", "hci0"]))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_ENV_NAMES) | st.text(max_size=20), _ENV_VALUES, max_size=6))
def test_arbitrary_environment_raises_only_config_errors(environ):
    _only_config_errors(lambda: Config.from_env(environ))


_NATIVE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(any_text, children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_NAMES), _NATIVE | _ENV_VALUES, max_size=4))
def test_arbitrary_overrides_raise_only_config_errors(overrides):
    _only_config_errors(lambda: Config().with_overrides(overrides))
    nested: dict = {}
    for name, value in overrides.items():
        section, _, key = name.partition(".")
        nested.setdefault(section, {})[key] = value
    _only_config_errors(lambda: Config.from_dict(nested))


@st.composite
def valid_configs(draw):
    finite = st.floats(min_value=0.001, max_value=1e6, allow_nan=False)
    initial = draw(finite)
    return Config(
        node=NodeConfig(
            key_file=draw(st.none() | any_text.filter(lambda t: t and t == t.strip() and "\x00" not in t
                                                      and not t.startswith("~")
                                                      and not any(0xD800 <= ord(c) <= 0xDFFF for c in t))),
            http=draw(st.none() | st.builds(HostPort, st.sampled_from(["127.0.0.1", "::", "example.org"]),
                                            st.integers(0, 65535))),
            log_level=draw(st.sampled_from(["debug", "INFO", "Error"]))),
        bootstrap=BootstrapConfig(
            enabled=draw(st.booleans()),
            peers=draw(st.lists(st.sampled_from([PEER_A, PEER_B, PEER_C]), max_size=4)),
            timeout_s=draw(finite), retries=draw(st.integers(0, 100)),
            backoff_initial_s=initial, backoff_max_s=initial + draw(st.floats(0, 1e6)),
            jitter=draw(st.floats(0, 1))),
        local=LocalConfig(mdns=draw(st.booleans()), scan_interval_s=draw(finite),
                          service_name=draw(st.sampled_from([DEFAULT_SERVICE_NAME, "_a1._udp.local."])),
                          ble_adapter=draw(st.none() | st.sampled_from(["hci0", "hci1"]))),
        dht=DhtSettings(k=draw(st.integers(1, MAX_BUCKET_SIZE)), alpha=draw(st.integers(1, MAX_BUCKET_SIZE)),
                        record_ttl_s=draw(st.floats(10, 604800)),
                        listen_host=draw(st.sampled_from([["::"], ["0.0.0.0", "::1"]])),
                        listen_port=draw(st.integers(0, 65535))),
    )


@settings(max_examples=200, deadline=None)
@given(valid_configs())
def test_export_round_trips(config):
    assert Config.from_toml(config.to_toml()) == config
    assert Config.from_dict(config.to_dict()) == config
    # Every value also survives the environment's text form.
    environ = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            name = env_var_name(f"{section}.{key}")
            if isinstance(value, bool):
                environ[name] = "true" if value else "false"
            elif isinstance(value, list):
                environ[name] = ",".join(value)
            elif value is None:
                environ[name] = ""
            elif isinstance(value, float):
                environ[name] = repr(value)
            else:
                environ[name] = str(value)
    assert Config.from_env(environ) == config


def test_environment_is_not_read_implicitly_by_from_toml(monkeypatch):
    monkeypatch.setenv("SOVEREIGN_DHT_K", "3")
    assert Config.from_toml("").dht.k == DEFAULT_BUCKET_SIZE
    assert Config.from_file(os.devnull).dht.k == DEFAULT_BUCKET_SIZE


def test_the_quick_start_configuration_loads():
    text = (DOCS.parent / "quickstart.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        config = Config.from_toml(block, source="docs/quickstart.md")
        assert config.bootstrap.peers and config.node.capabilities == ("storage",)
