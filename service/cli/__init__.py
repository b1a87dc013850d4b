"""The `bnserve` command line: the server's commands and the API's, over `service.client`."""

from __future__ import annotations


def main() -> None:
    """The console script's entry point."""
    from service.cli.app import cli

    cli(prog_name="bnserve")
