"""``tafe campaigns validate`` and the start-up refusal of a bad file, as real processes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from tafe.settings import Settings

from .stub import HERE

DOC = json.loads((HERE / "campaigns.json").read_text())


def tafe(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "TAFE_LOG_JSON": "0"}
    return subprocess.run([sys.executable, "-m", "tafe", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def bad_file(tmp_path):
    doc = copy.deepcopy(DOC)
    doc["campaigns"][0]["daily_budget"] = 0
    doc["campaigns"][0]["landing_url"] = "www.shop.example"
    doc["campaigns"][2]["frequency_cap"] = {"impressions": -3, "window_s": 3600}
    doc["campaigns"][2]["pacing"] = "slow"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


def test_validate_prints_every_error_with_its_path_and_exits_1(bad_file):
    out = tafe("campaigns", "validate", str(bad_file))
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines() == [
        "campaigns[0].daily_budget: expected a positive number (at least 0.000001)",
        "campaigns[0].landing_url: expected an absolute http or https URL",
        'campaigns[2].pacing: expected "even" or "asap"',
        "campaigns[2].frequency_cap.impressions: expected a positive integer",
    ]
    assert out.stderr == ""


def test_validate_a_good_file_prints_one_summary_line(tmp_path):
    out = tafe("campaigns", "validate", str(HERE / "campaigns.json"))
    assert (out.returncode, out.stdout) == (0, f"{HERE / 'campaigns.json'}: {len(DOC['campaigns'])} campaigns OK\n")


def test_validate_defaults_to_the_bundled_demo_set():
    out = tafe("campaigns", "validate")
    assert (out.returncode, out.stdout) == (0, f"{Settings().campaigns}: 8 campaigns OK\n"), out.stderr


def test_validate_checks_the_currency_tafe_bids_in():
    out = tafe("campaigns", "validate", "--currency", "EUR", str(HERE / "campaigns.json"))
    assert (out.returncode, out.stdout) == (1, "currency: prices are in USD but TAFE bids in EUR\n")


@pytest.mark.parametrize("content", [None, "{not json"])
def test_validate_an_unreadable_file_is_one_line(tmp_path, content):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    out = tafe("campaigns", "validate", str(path))
    assert out.returncode == 1 and len(out.stdout.splitlines()) == 1
    assert out.stdout.startswith(f"campaigns file {path}: ")


@pytest.mark.parametrize(
    "command",
    [("serve", "--workers", "1"), ("serve", "--workers", "2"), ("up", "--workers", "2")],
    ids=["serve-in-process", "serve-prefork", "up"],
)
def test_serving_a_bad_file_is_refused_in_one_line(bad_file, command):
    out = tafe(*command, "--campaigns", str(bad_file), "--host", "127.0.0.1", "--port", "0", "--admin-port", "-1")
    assert out.returncode == 2
    assert out.stderr == (
        f"tafe: campaigns file {bad_file}: campaigns[0].daily_budget: expected a positive number (at least 0.000001)"
        " (and 3 more errors: tafe campaigns validate lists them all)\n"
    )
