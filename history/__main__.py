"""``python -m history upgrade [--url URL]``: apply the history database's pending migrations (the
URL from ``ADVERSA_HISTORY_URL``/the var dir unless given). Processes also do it on first use."""

from __future__ import annotations

import argparse
import sys

from contracts.settings import CommonSettings
from history.store import HistoryStore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m history", description=__doc__)
    parser.add_argument("command", choices=["upgrade"])
    parser.add_argument("--url", help="SQLAlchemy URL of the history database")
    args = parser.parse_args(argv)
    store = HistoryStore(args.url or CommonSettings().history_database_url)
    try:
        store.upgrade()
    finally:
        store.close()
    sys.stdout.write(f"history database at head: {store.engine.url.render_as_string()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
