"""`python -m service`: the API server (and, with BNSERVE_WORKERS > 0, its training workers).

The same command as `bnserve serve`, with the same options (`--help` lists them); an unknown
argument is refused (exit 2) before anything starts.
"""

from __future__ import annotations

from service.cli.serve import serve


def main() -> None:
    serve.main(prog_name="python -m service")


if __name__ == "__main__":
    main()
