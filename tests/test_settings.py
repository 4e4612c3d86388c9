"""Settings resolve defaults < TOML < TAFE_* environment < command line, with clear errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

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


def test_serve_help_explains_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "tafe", "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for f in dataclasses.fields(s.Settings):
        assert "--" + f.name.replace("_", "-") in out, f.name
        assert "TAFE_" + f.name.upper() in out, f.name


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
    assert "gvl_vendor_id must be 0-65535" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
