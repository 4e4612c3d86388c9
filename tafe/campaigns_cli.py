"""``tafe campaigns validate [FILE]``: every mistake in a campaigns file, before it is served.

The same checks as ``tafe serve`` runs at start-up (``tafe.core.campaigns.validate``), but
where serving stops at the first error in one line, this prints all of them, one per line as
``json.path: message`` (``campaigns[2].frequency_cap.impressions: expected a positive
integer``), and exits 1; a good file prints ``FILE: N campaigns OK`` and exits 0. FILE
defaults to the configured ``campaigns`` setting; the file's currency is checked against the
configured ``currency``, as serving would.
"""

from __future__ import annotations

import argparse

from tafe.cli import add_settings_options, settings_from_args
from tafe.core import campaigns


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    subs = parser.add_subparsers(dest="campaigns_command", metavar="SUBCOMMAND", required=True)
    p = subs.add_parser(
        "validate",
        help="print every error of a campaigns file as json.path: message (exit 1), or a one-line summary (exit 0)",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="campaigns file (default: the campaigns setting)")
    add_settings_options(p, "campaigns")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    path = args.file or settings.campaigns
    try:
        data = campaigns.read(path)
    except campaigns.CampaignsError as exc:
        print(exc)
        return 1
    found, errors = campaigns.validate(data, seat=settings.seat, currency=settings.currency)
    for error in errors:
        print(error)
    if found is None:
        return 1
    print(f"{path}: {len(found)} campaign{'s' * (len(found) != 1)} OK")
    return 0
