"""The LAN discovery settings: lan_discovery (a boolean), its port and explicit targets."""

from __future__ import annotations

import pytest

from node.config import load_settings
from node.errors import ConfigError


def test_lan_discovery_is_on_by_default_and_turns_off(tmp_path) -> None:
    s = load_settings(tmp_path, env={})
    assert s.lan_discovery is True and s.lan_discovery_port == 21029
    assert s.lan_announce_targets == []
    (tmp_path / "config.toml").write_text(
        'lan_discovery = false\nlan_discovery_port = 4000\n'
        'lan_announce_targets = ["127.0.0.1:4000", "[::1]:4001"]\n')
    s = load_settings(tmp_path, env={})
    assert (s.lan_discovery, s.lan_discovery_port) == (False, 4000)
    assert s.lan_announce_targets == ["127.0.0.1:4000", "[::1]:4001"]
    assert load_settings(tmp_path, env={"P2PFS_LAN_DISCOVERY": "yes"}).lan_discovery is True
    # --no-lan-discovery passes False; a flag not given (None) leaves the file's value
    assert load_settings(tmp_path, {"lan_discovery": None}, env={}).lan_discovery is False
    (tmp_path / "config.toml").write_text("")
    assert load_settings(tmp_path, {"lan_discovery": False}, env={}).lan_discovery is False


@pytest.mark.parametrize("content, match", [
    ('lan_discovery = "maybe"', "lan_discovery' must be true or false"),
    ("lan_discovery = 1", "lan_discovery' must be true or false"),
    ("lan_discovery_port = 70000", "lan_discovery_port' must be a port number"),
    ('lan_announce_targets = ["127.0.0.1"]', "HOST:PORT entries"),
    ('lan_announce_targets = ["127.0.0.1:0"]', "HOST:PORT entries"),
])
def test_bad_lan_settings_name_the_key(tmp_path, content: str, match: str) -> None:
    (tmp_path / "config.toml").write_text(content + "\n")
    with pytest.raises(ConfigError, match=match):
        load_settings(tmp_path, env={})


def test_bad_lan_env_names_the_variable(tmp_path) -> None:
    with pytest.raises(ConfigError, match="P2PFS_LAN_DISCOVERY"):
        load_settings(tmp_path, env={"P2PFS_LAN_DISCOVERY": "perhaps"})
