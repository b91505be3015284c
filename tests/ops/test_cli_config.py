"""Operator-facing surfaces: the sipfarm command line and the configuration loader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sipfarm.config import ConfigError, NodeConfig, load


def sipfarm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipfarm", *args], capture_output=True, text=True, input=stdin, timeout=60
    )


def test_user_add_list_passwd_del(redis_url):
    added = sipfarm("user", "add", "dave@farm.test", "--password", "pw1-long-enough", "--redis", redis_url)
    assert added.returncode == 0, added.stderr
    again = sipfarm("user", "add", "dave@farm.test", "--password", "pw1-long-enough", "--redis", redis_url)
    assert again.returncode == 1 and "exists" in again.stderr
    listed = sipfarm("user", "list", "--redis", redis_url)
    assert "dave@farm.test" in listed.stdout
    changed = sipfarm("user", "passwd", "dave@farm.test", "--redis", redis_url, stdin="pw2-long-enough\n")
    assert changed.returncode == 0, changed.stderr
    # a password an online guesser finds (a PIN, the user name) only with --weak-password
    for weak in ("0042", "1234567"):
        refused = sipfarm("user", "passwd", "dave@farm.test", "--password", weak, "--redis", redis_url)
        assert refused.returncode == 2 and "weak password" in refused.stderr, refused.stderr
    forced = sipfarm("user", "passwd", "dave@farm.test", "--password", "0042", "--weak-password", "--redis", redis_url)
    assert forced.returncode == 0, forced.stderr
    deleted = sipfarm("user", "del", "dave@farm.test", "--redis", redis_url)
    assert deleted.returncode == 0
    missing = sipfarm("user", "del", "dave@farm.test", "--redis", redis_url)
    assert missing.returncode == 1 and "no account" in missing.stderr


def test_user_command_with_dead_redis_is_one_clear_line():
    result = sipfarm("user", "list", "--redis", "redis://127.0.0.1:1/0")
    assert result.returncode == 1
    assert "unavailable" in result.stderr and "Traceback" not in result.stderr


def test_node_with_bad_setting_names_the_key(tmp_path: Path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nworkers = "many"\n')
    result = sipfarm("node", "--config", str(cfg))
    assert result.returncode == 2
    assert "workers" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        ({"listen": ["carrier-pigeon:1.2.3.4:5"]}, "listen"),
        ({"workers": 0}, "workers"),
        ({"redis": "http://x"}, "redis"),
        ({"min_expires": 600, "default_expires": 60}, "default_expires"),
        ({"digest_algorithms": ["SHA-1"]}, "digest_algorithms"),
        ({"bogus": 1}, "bogus"),
        ({"relays": ["relay.example:2223"]}, "relays"),
    ],
)
def test_config_errors_name_the_key(flags, key):
    with pytest.raises(ConfigError, match=key):
        load(NodeConfig, None, flags, environ={})


def test_config_layers_file_env_flags(tmp_path: Path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\nworkers = 2\ndomains = ["a.test"]\nmin_expires = 30\n')
    out = load(NodeConfig, cfg, {"workers": 3}, section="node", environ={"SIPFARM_MIN_EXPIRES": "45"})
    assert out.workers == 3 and out.domains == ["a.test"] and out.min_expires == 45
