"""fleet.toml: parsing, resolution of defaults and groups, and every error."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeq.errors import FleetError
from edgeq.fleet.config import batch_size, load_fleet
from edgeq.fleet.rollout import plan_batches

REPO = Path(__file__).resolve().parents[1]

BASE = """
[fleet]
model = "stories.gguf"

[defaults]
install_dir = "/opt/edgeq"

[groups.pis]
hosts = ["pi-1", "pi-2"]
device = "rpi5-8gb"
min_decode_share = 0.3

[hosts.pi-1]
address = "10.0.0.1"

[hosts.pi-2]
address = "10.0.0.2"
min_decode_share = 0.9

[hosts.box]
address = "127.0.0.1"
device = "intel-n100-16gb"
port = 2200
"""


def _load(tmp_path: Path, text: str):
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return load_fleet(path)


def test_example_parses_and_batches():
    config = load_fleet(REPO / "examples" / "fleet.toml")
    assert config.hosts["pi-store"].port == 2222
    assert config.hosts["pi-hall"].device == "rpi5-8gb"  # from its group
    assert config.hosts["n100-desk"].user == "admin"  # host beats defaults
    batches = plan_batches(config, list(config.hosts.values()))
    assert batches == [["pi-kitchen"], ["pi-hall", "pi-store"], ["n100-desk"]]


def test_defaults_then_groups_then_host(tmp_path):
    config = _load(tmp_path, BASE)
    assert config.hosts["pi-1"].min_decode_share == 0.3
    assert config.hosts["pi-2"].min_decode_share == 0.9
    assert config.hosts["pi-1"].groups == ("pis",)
    assert config.hosts["box"].is_loopback and not config.hosts["pi-1"].is_loopback
    assert config.state_dir == tmp_path / ".edgeq-fleet"
    assert config.cache_dir == tmp_path / ".edgeq-fleet" / "cache"
    assert [h.name for h in config.select(["pis"])] == ["pi-1", "pi-2"]


def test_batch_sizes():
    assert batch_size("50%", 5) == 3
    assert batch_size("10%", 3) == 1
    assert batch_size(2, 100) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (('address = "10.0.0.1"', 'address = "10.0.0.1"\nport = "22"'),
         "host 'pi-1': field 'port' must be an integer port"),
        (('address = "10.0.0.1"', 'adress = "x"'),
         "host 'pi-1': unknown field 'adress'; did you mean 'address'?"),
        (('device = "intel-n100-16gb"', 'device = "rpi6"'),
         "host 'box': field 'device': unknown device 'rpi6'"),
        (('install_dir = "/opt/edgeq"', 'install_dir = "opt"'),
         "[defaults]: field 'install_dir' must be an absolute path"),
        (('min_decode_share = 0.3', 'min_decode_share = "high"'),
         "group 'pis': field 'min_decode_share' must be a number"),
        (('hosts = ["pi-1", "pi-2"]', 'hosts = ["pi-1", "pi-9"]'),
         "group 'pis': field 'hosts' names 'pi-9'"),
        (('port = 2200', 'port = 2200\nservice = "launchd"'),
         "host 'box': field 'service' must be one of systemd, supervisor, none"),
        (('min_decode_share = 0.9', 'min_decode_share = -1'),
         "host 'pi-2': field 'min_decode_share' must be a number >= 0"),
        (('[hosts.box]\naddress = "127.0.0.1"\n', '[hosts.box]\n'),
         "host 'box': field 'address' is missing"),
    ],
)  # fmt: skip
def test_errors_name_host_and_field(tmp_path, change, message):
    old, new = change
    assert old in BASE
    with pytest.raises(FleetError) as err:
        _load(tmp_path, BASE.replace(old, new))
    assert message in str(err.value)
    assert str(tmp_path / "fleet.toml") in str(err.value)


def test_host_value_error_names_host(tmp_path):
    text = BASE.replace("port = 2200", 'port = 2200\ninstall_dir = "rel"')
    with pytest.raises(
        FleetError, match="host 'box': field 'install_dir' must be an absolute"
    ):
        _load(tmp_path, text)


def test_conflicting_groups(tmp_path):
    text = BASE + '\n[groups.fast]\nhosts = ["pi-1"]\nmin_decode_share = 0.8\n'
    with pytest.raises(
        FleetError, match="host 'pi-1': groups 'pis' and 'fast' set field"
    ):
        _load(tmp_path, text)


@pytest.mark.parametrize(
    "rollout, message",
    [
        ('canary = ["nobody"]', "no host or group 'nobody'"),
        ('batch = "150%"', "field 'batch' must be a host count"),
        ("batch = 0", "field 'batch' must be a host count"),
        ("max_failure_percent = 101", "field 'max_failure_percent' must be 0-100"),
        ("keep_releases = 0", "field 'keep_releases' must be an integer >= 1"),
        ("[rollout.gate]\nmax_tokens = 1", "[rollout.gate]: field 'max_tokens'"),
        ("[rollout.gate]\nmin_share = 1", "unknown field 'min_share'"),
    ],
)
def test_rollout_errors(tmp_path, rollout, message):
    with pytest.raises(FleetError) as err:
        _load(tmp_path, BASE + "\n[rollout]\n" + rollout + "\n")
    assert message in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(FleetError, match="file not found"):
        load_fleet(tmp_path / "missing.toml")
    with pytest.raises(FleetError, match="not valid TOML"):
        _load(tmp_path, "[fleet\n")
    with pytest.raises(FleetError, match="field 'model' is missing"):
        _load(tmp_path, BASE.replace('model = "stories.gguf"', ""))
    with pytest.raises(FleetError, match="unknown field 'bitz'"):
        _load(tmp_path, BASE + "\n[build]\nbitz = 4\n")
