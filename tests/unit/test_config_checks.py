"""Settings checks that name the key: log level, bootstrap URLs, ports from --port."""

from __future__ import annotations

import pytest

from node.config import is_bootstrap_url, load_settings, port_option, port_overrides
from node.errors import ConfigError

NONE_GIVEN = {"tcp_port": None, "udp_port": None, "quic_port": None, "dht_port": None,
              "gui_port": None}


def test_port_sets_every_port_and_each_given_alone_wins() -> None:
    assert port_overrides(9000, NONE_GIVEN) == {
        "tcp_port": 9000, "udp_port": 9001, "quic_port": 9002, "dht_port": 9003,
        "gui_port": 9004}
    assert port_overrides(9000, {**NONE_GIVEN, "dht_port": 7000, "udp_port": 0}) == {
        "tcp_port": 9000, "udp_port": 0, "quic_port": 9002, "dht_port": 7000, "gui_port": 9004}
    # --port 0: any free ports, and (gui_port 0) no dashboard
    assert port_overrides(0, NONE_GIVEN) == dict.fromkeys(NONE_GIVEN, 0)
    assert port_overrides(9000, {**NONE_GIVEN, "gui_port": 0})["gui_port"] == 0
    assert port_overrides(None, {**NONE_GIVEN, "tcp_port": 1}) == {**NONE_GIVEN, "tcp_port": 1}
    with pytest.raises(ConfigError, match="--port"):
        port_overrides(65533, NONE_GIVEN)
    with pytest.raises(ConfigError, match="--port"):
        port_overrides(65532, NONE_GIVEN)  # its dashboard would be on 65536
    assert "--dht-port" in port_option("dht") and "dht_port" in port_option("dht")
    assert port_option("udp", bad_address=True).startswith("--listen-host")
    assert "--gui-port" in port_option("gui") and "gui_port" in port_option("gui")
    assert port_option("gui", bad_address=True).startswith("--gui-host")


def test_port_flags_beat_config_and_env(tmp_path) -> None:
    (tmp_path / "config.toml").write_text("dht_port = 5000\nudp_port = 5001\n")
    s = load_settings(tmp_path, port_overrides(9000, NONE_GIVEN),
                      env={"P2PFS_QUIC_PORT": "5002"})
    assert (s.tcp_port, s.udp_port, s.quic_port, s.dht_port) == (9000, 9001, 9002, 9003)


@pytest.mark.parametrize("url, ok", [
    ("http://127.0.0.1:8470", True), ("https://boot.example", True), ("http://a", True),
    ("http//no-scheme", False), ("ftp://host", False), ("http://:8470", False),
    ("http://127.0.0.1:99999", False), ("http://127.0.0.1:port", False), ("", False),
])
def test_bootstrap_url_shape(url: str, ok: bool) -> None:
    assert is_bootstrap_url(url) is ok


def test_bad_bootstrap_url_names_the_source_and_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="P2PFS_BOOTSTRAP: key 'bootstrap'.*'not a url'"):
        load_settings(tmp_path, env={"P2PFS_BOOTSTRAP": "http://ok:1, not a url"})
    with pytest.raises(ConfigError, match="--bootstrap"):
        load_settings(tmp_path, {"bootstrap": ["nope"]}, env={})


def test_log_level_is_checked_and_normalized(tmp_path) -> None:
    assert load_settings(tmp_path, {"log_level": "debug"}, env={}).log_level == "DEBUG"
    with pytest.raises(ConfigError, match="--log-level.*LOUD"):
        load_settings(tmp_path, {"log_level": "LOUD"}, env={})
    with pytest.raises(ConfigError, match="P2PFS_LOG_LEVEL"):
        load_settings(tmp_path, env={"P2PFS_LOG_LEVEL": "loud"})


def test_env_integer_message_is_plain(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, env={"P2PFS_TCP_PORT": "abc"})
    assert str(info.value) == ("environment P2PFS_TCP_PORT: key 'tcp_port' must be an integer, "
                               "got 'abc'")
    assert load_settings(tmp_path, env={"P2PFS_TCP_PORT": " 9000 "}).tcp_port == 9000
