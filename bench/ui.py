"""Render time of the web pages (/ui) over a history of 1,000 jobs, on SQLite and on PostgreSQL.

    .venv/bin/python -m bench.ui [--jobs 1000] [--repeats 15] [--out bench/results]

Fills a fresh history database (SQLite in a temporary var dir; a fresh schema of the test PostgreSQL
on 127.0.0.1:5432, as the tests use it) with ``--jobs`` jobs of one team: one in ten is an audit of
``fmnist-cnn`` (10 versions x ``jobs/100`` audits, each with its stored report), the others attacks
(one in ten failed). Then signs in with a key and times, in process through the whole ASGI app
(middleware, session check, database, templates, matplotlib; no network), each page ``--repeats``
times after a first, cold render (for the model page: the chart drawn; then the page reuses it until
a newer audit comes in):

* ``/ui/models`` (every visible model with its latest audit),
* ``/ui/models/fmnist-cnn`` (the history chart over 7 versions and the table of all its audits),
* ``/ui/jobs`` (the first page of 50) and the page after it (by cursor),
* ``/ui/reports/<id>`` (a stored report, inline).

Writes ``ui.md`` and ``ui.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from history.store import HistoryStore
from service.app import create_app
from service.settings import Settings
from service.ui import summary
from tests.history_db import database
from tests.ui_support import fill

KEY = "bench-key"
TEAM = "bench"


def _time(client: TestClient, path: str, repeats: int) -> dict[str, float]:
    def once() -> float:
        start = time.perf_counter()
        response = client.get(path)
        elapsed = time.perf_counter() - start
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
        return elapsed * 1000

    cold = once()
    runs = sorted(once() for _ in range(repeats))
    return {"cold_ms": cold, "median_ms": statistics.median(runs), "min_ms": runs[0], "max_ms": runs[-1]}


def bench(kind: str, jobs: int, repeats: int, redis_url: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as url:
        settings = Settings(redis_url=redis_url, var_dir=Path(tmp) / "var", history_url=url,
                            api_keys={KEY: TEAM})
        with TestClient(create_app(settings), follow_redirects=False) as client:
            history = HistoryStore(url)
            start = time.perf_counter()
            ids = fill(history, client.app.state.store, TEAM, jobs, versions=10,  # type: ignore[attr-defined]
                       audits_per_version=max(1, jobs // 100))
            fill_s = time.perf_counter() - start
            history.close()
            form = client.get("/ui/login").text
            csrf = re.search(r'name="csrf" value="([^"]+)"', form)
            assert csrf
            assert client.post("/ui/login", data={"key": KEY, "csrf": csrf.group(1)}).status_code == 303
            first = client.get("/ui/jobs").text
            cursor = re.search(r'cursor=([^"&]+)">older', first)
            assert cursor
            pages = {"/ui/models": "/ui/models", "/ui/models/fmnist-cnn": "/ui/models/fmnist-cnn",
                     "/ui/jobs": "/ui/jobs", "/ui/jobs?cursor=(page 2)": f"/ui/jobs?cursor={cursor.group(1)}",
                     "/ui/reports/<id>": f"/ui/reports/{ids[0]}"}
            summary._charts.cache_clear()  # cold means cold: nothing drawn by an earlier run
            timings = {name: _time(client, path, repeats) for name, path in pages.items()}
            sizes = {name: len(client.get(path).content) for name, path in pages.items()}
    return {"database": kind, "jobs": jobs, "fill_s": fill_s, "pages": timings, "bytes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--redis-url", default=os.environ.get("ADVERSA_TEST_REDIS_URL",
                                                              "redis://127.0.0.1:6379/15"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    runs = [bench(kind, args.jobs, args.repeats, args.redis_url) for kind in ("sqlite", "postgresql")]
    load_after = os.getloadavg()[0]
    command = "`.venv/bin/python -m bench.ui" + (f" --jobs {args.jobs}" if args.jobs != 1000 else "") + \
        (f" --repeats {args.repeats}" if args.repeats != 15 else "") + "`"
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"command": command.strip("`"), "when": when, "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(), "load_before": load_before, "load_after": load_after,
            "repeats": args.repeats}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ui.json").write_text(json.dumps({**meta, "runs": runs}, indent=2) + "\n")
    lines = [f"# Web page render time over a history of {args.jobs} jobs", "",
             f"{command} ({when}; {os.cpu_count()} CPU cores, load average {load_before:.2f} before, "
             f"{load_after:.2f} after: the machine is shared)", "",
             f"In process through the whole ASGI app (session check, database, templates, matplotlib; no "
             f"network), signed in. Median of {args.repeats} renders after a cold first one (the model page's "
             f"first render draws its chart with matplotlib; later ones reuse it until a newer audit comes "
             f"in). {args.jobs // 10} of the jobs are audits of 10 versions of one model; the chart shows "
             f"the newest 7.",
             "", "| database | page | cold ms | median ms | min ms | max ms | bytes |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        for name, t in run["pages"].items():
            lines.append(f"| {run['database']} | `{name}` | {t['cold_ms']:.1f} | {t['median_ms']:.1f} | "
                         f"{t['min_ms']:.1f} | {t['max_ms']:.1f} | {run['bytes'][name]} |")
    lines += ["", "Filling the history (recording the jobs, rendering and storing each audit's report): " +
              ", ".join(f"{r['database']} {r['fill_s']:.1f} s" for r in runs) + "."]
    (args.out / "ui.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
