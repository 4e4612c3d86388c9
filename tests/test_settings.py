"""Settings resolve defaults < TOML < TAFE_* environment < command line, with clear errors."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tafe import settings as s
from tafe.cli import build_parser, settings_from_args


def test_defaults_when_nothing_is_given():
    got = s.load(environ={})
    assert got == s.Settings(workers=os.cpu_count() or 1)  # 0, the default, means one per core
    assert got.port == 8080


def test_precedence_toml_env_cli(tmp_path):
    cfg = tmp_path / "tafe.toml"
    cfg.write_text('port = 9000\nhost = "0.0.0.0"\nnbr-in-response = true\nmax_body_bytes = 1000\n')
    got = s.load(config=cfg, environ={"TAFE_PORT": "9100", "TAFE_LOG_JSON": "yes"}, overrides={"port": 9200})
    assert got.port == 9200  # command line beats env beats file
    assert got.host == "0.0.0.0"  # from the file
    assert got.nbr_in_response is True and got.log_json is True
    assert got.max_body_bytes == 1000


def test_toml_may_nest_under_a_tafe_table(tmp_path):
    cfg = tmp_path / "tafe.toml"
    cfg.write_text("[tafe]\nport = 9001\n")
    assert s.load(config=cfg, environ={}).port == 9001


def test_config_from_environment_variable(tmp_path):
    cfg = tmp_path / "tafe.toml"
    cfg.write_text("port = 9002\n")
    assert s.load(environ={"TAFE_CONFIG": str(cfg)}).port == 9002


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"environ": {"TAFE_PORT": "eighty"}}, "TAFE_PORT"),
        ({"environ": {"TAFE_LOG_JSON": "maybe"}}, "log_json"),
        ({"environ": {}, "overrides": {"max_body_bytes": 1.5}}, "max_body_bytes"),
    ],
)
def test_bad_values_name_their_source(kwargs, needle):
    with pytest.raises(s.SettingsError, match=needle):
        s.load(**kwargs)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"environ": {"TAFE_WORKERS": "-1"}}, "environment TAFE_WORKERS: workers must be >= 0, got -1"),
        ({"environ": {}, "overrides": {"port": 70000}}, "command line: port must be 0..65535, got 70000"),
        ({"environ": {}, "overrides": {"admin_port": -2}}, "admin_port must be -1..65535"),
        ({"environ": {}, "overrides": {"profile_sample": 5}}, "profile_sample must be 0..1, got 5.0"),
        ({"environ": {"TAFE_DECISION_LOG_SAMPLE": "nan"}}, "decision_log_sample must be 0..1"),
        ({"environ": {"TAFE_MAX_BODY_BYTES": "-5"}}, "max_body_bytes must be >= 1"),
        ({"environ": {"TAFE_DRAIN_TIMEOUT_S": "-1"}}, "drain_timeout_s must be >= 0"),
        ({"environ": {"TAFE_LOG_LEVEL": "loud"}}, "log_level must be one of debug, info, warning, error"),
    ],
)
def test_values_outside_their_rule_are_refused_naming_source_and_rule(kwargs, needle):
    with pytest.raises(s.SettingsError, match=re.escape(needle)):
        s.load(**kwargs)


def test_a_rule_breaking_toml_value_names_the_file(tmp_path):
    cfg = tmp_path / "tafe.toml"
    cfg.write_text("[tafe]\nport = -1\n")
    with pytest.raises(s.SettingsError, match=f"config file {re.escape(str(cfg))}: port must be 0..65535"):
        s.load(config=cfg, environ={})


def test_settings_built_directly_are_validated_too():
    with pytest.raises(s.SettingsError, match="max_connections must be >= 1"):
        s.Settings(max_connections=0)
    with pytest.raises(s.SettingsError, match="port must be 0..65535"):
        s.Settings().with_overrides(port=-1)


def test_unknown_key_in_file_is_refused(tmp_path):
    cfg = tmp_path / "tafe.toml"
    cfg.write_text("prot = 1\n")
    with pytest.raises(s.SettingsError, match="unknown setting 'prot'"):
        s.load(config=cfg, environ={})


def test_broken_toml_is_refused(tmp_path):
    cfg = tmp_path / "tafe.toml"
    cfg.write_text("port = \n")
    with pytest.raises(s.SettingsError, match="config file"):
        s.load(config=cfg, environ={})


def test_workers_zero_means_one_per_core():
    assert s.load(environ={"TAFE_WORKERS": "0"}).workers == (os.cpu_count() or 1)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.Settings().port = 1  # type: ignore[misc]


def test_command_line_options_cover_every_setting(monkeypatch):
    monkeypatch.delenv("TAFE_PORT", raising=False)
    parser = build_parser(only="serve")
    args = parser.parse_args(["serve", "--port", "1234", "--no-log-json", "--profile-sample", "0.5"])
    got = settings_from_args(args)
    assert (got.port, got.log_json, got.profile_sample) == (1234, False, 0.5)


@pytest.mark.parametrize("command", ["serve", "up", "nginx"])
def test_help_lists_exactly_the_settings_a_command_uses_with_their_rules(command):
    out = subprocess.run(
        [sys.executable, "-m", "tafe", command, "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    out = " ".join(out.split())  # argparse wraps lines
    for f in dataclasses.fields(s.Settings):
        used = command in f.metadata["commands"]
        assert (("--" + f.name.replace("_", "-") + " ") in out) == used, f.name
        assert ("TAFE_" + f.name.upper() + ")" in out) == used, f.name
        if used and s.rule(f.name):
            assert f"({s.rule(f.name)}; default:" in out, f.name
    assert ("--nginx " in out) == (command != "serve")


def test_readme_table_gives_every_setting_its_rule_and_help():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for f in dataclasses.fields(s.Settings):
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{f.name}` |")), None)
        assert row is not None, f.name
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[2] == (s.rule(f.name) or "any") and cells[3] == f.metadata["help"], row


def test_version():
    from tafe import __version__

    out = subprocess.run([sys.executable, "-m", "tafe", "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == f"tafe {__version__}\n"


def test_gvl_vendor_id_from_env_and_command_line():
    assert s.load(environ={}).gvl_vendor_id == 0  # not registered
    assert s.load(environ={"TAFE_GVL_VENDOR_ID": "1234"}).gvl_vendor_id == 1234
    args = build_parser().parse_args(["serve", "--gvl-vendor-id", "52"])
    assert settings_from_args(args).gvl_vendor_id == 52


@pytest.mark.parametrize("value", ["-1", "65536"])
def test_gvl_vendor_id_out_of_range_is_one_line(value):
    out = subprocess.run(
        [sys.executable, "-m", "tafe", "serve", "--gvl-vendor-id", value],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "gvl_vendor_id must be 0..65535" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
