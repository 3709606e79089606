from __future__ import annotations

import pytest

from node.config import load_settings
from node.errors import ConfigError


def test_precedence_defaults_file_env_flags(tmp_path) -> None:
    assert load_settings(tmp_path, env={}).tcp_port == 8471
    (tmp_path / "config.toml").write_text(
        'tcp_port = 9000\ntransport = "udp"\nbootstrap = ["http://a"]\n')
    s = load_settings(tmp_path, env={})
    assert (s.tcp_port, s.transport, s.bootstrap) == (9000, "udp", ["http://a"])
    env = {"P2PFS_TCP_PORT": "9100", "P2PFS_BOOTSTRAP": "http://b, http://c"}
    s = load_settings(tmp_path, env=env)
    assert s.tcp_port == 9100 and s.bootstrap == ["http://b", "http://c"]
    s = load_settings(tmp_path, {"tcp_port": 9200, "transport": None},
                      env={"P2PFS_TCP_PORT": "9100"})
    assert s.tcp_port == 9200 and s.transport == "udp"


@pytest.mark.parametrize(
    "content, match",
    [
        ("tcp_port = [", "not valid TOML"),
        ("nope = 1", "unknown key 'nope'"),
        ('tcp_port = "x"', "key 'tcp_port'"),
        ("tcp_port = 70000", "key 'tcp_port'"),
        ('transport = "carrier-pigeon"', "key 'transport'"),
        ("bootstrap = 5", "key 'bootstrap'"),
    ],
)
def test_malformed_file_names_file_and_key(tmp_path, content: str, match: str) -> None:
    (tmp_path / "config.toml").write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings(tmp_path, env={})
    assert "config.toml" in str(info.value)


def test_bad_env_names_variable(tmp_path) -> None:
    with pytest.raises(ConfigError, match="P2PFS_UDP_PORT"):
        load_settings(tmp_path, env={"P2PFS_UDP_PORT": "many"})
