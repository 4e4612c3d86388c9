"""The ``tafe`` command: one sub-command per concern, each living beside its code.

Sub-commands are listed in ``COMMANDS`` as ``name -> (module, help)``; each module has
``add_arguments(parser, command)`` and ``run(args) -> int``. Modules are imported only for the
command being run (and for ``--help``), so ``tafe serve`` can monkey-patch before
anything that touches sockets or threads is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence

from tafe import __version__
from tafe import settings as settings_mod
from tafe.core.campaigns import CampaignsError  # pure: safe to import before monkey-patching

COMMANDS: dict[str, tuple[str, str | None]] = {
    "serve": ("tafe.serve", "serve bid requests in the foreground (gevent workers, no Nginx)"),
    "worker": ("tafe.worker", None),  # internal: one pre-forked worker, started by the master
    "up": ("tafe.up", "run the whole node: Nginx in front of the master and its workers, plus the admin listener"),
    "nginx": ("tafe.nginx", "render the shipped Nginx config, or run a real Nginx with it"),
    "cqs": ("tafe.cqs.cli", "CQS models and user stores: synth, build-store, train, evaluate, inspect, pipeline"),
    "campaigns": ("tafe.campaigns_cli", "campaigns files: validate (every error, with its place in the file)"),
    "exchanges": ("tafe.exchanges", "exchange profiles files: validate (every error, with its place in the file)"),
}


def add_settings_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add one ``--option`` per Settings field that ``command`` uses.

    Defaults stay None so that an absent option does not hide TAFE_* variables or
    the TOML file; ``--help`` shows the allowed values, the built-in default and the
    variable name.
    """
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings (also TAFE_CONFIG)")
    group = parser.add_argument_group("settings (each also TAFE_<NAME> in the environment or NAME in the TOML file)")
    for f in dataclasses.fields(settings_mod.Settings):
        if command not in f.metadata["commands"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        allowed = settings_mod.rule(f.name)
        help_text = f"{f.metadata['help']} ({allowed + '; ' if allowed else ''}default: {f.default!r}; env TAFE_{f.name.upper()})"
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = {int: "N", float: "X", str: "S"}[type(f.default)]
            group.add_argument(flag, dest=f.name, type=type(f.default), default=None, metavar=metavar, help=help_text)


def settings_from_args(args: argparse.Namespace) -> settings_mod.Settings:
    overrides = {name: getattr(args, name) for name in settings_mod.FIELDS if hasattr(args, name)}
    return settings_mod.load(config=getattr(args, "config", None), overrides=overrides)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tafe",
        description="TAFE: an OpenRTB 2.5/2.6 bidding front end on gevent, behind Nginx.",
    )
    parser.add_argument("--version", action="version", version=f"tafe {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            continue
        # Without help, a command is left out of the list of commands.
        sub = subs.add_parser(name, description=help_text, help=help_text) if help_text else subs.add_parser(name)
        module = importlib.import_module(module_name)
        module.add_arguments(sub, name)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command in ("serve", "worker"):
        # Patch first and in one place: everything imported after this sees
        # cooperative sockets, threads and sleeps.
        from gevent import monkey

        monkey.patch_all()
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (settings_mod.SettingsError, CampaignsError) as exc:
        parser.exit(2, f"tafe: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
