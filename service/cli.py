"""The ``adversa`` command: ``serve``, ``worker``, ``models``."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Adversa: adversarial-robustness service.", no_args_is_help=True)
console = Console()


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="worker processes to start")] = 1,
    log_level: str = "info",
) -> None:
    """Run the gateway, one worker per --workers, and an embedded Redis unless REDIS_URL is set."""
    from service.serve import serve as run
    from service.settings import Settings

    _logging(log_level)
    run(Settings(host=host, port=port, workers=workers))


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="exit when the queues are empty")] = False,
    name: Annotated[str | None, typer.Option(help="worker name")] = None,
    die_with_parent: Annotated[bool, typer.Option(hidden=True)] = False,
    log_level: str = "info",
) -> None:
    """Run one worker (no fork per job, models kept warm) on the queues named in settings."""
    from workers.main import die_with_parent as arm
    from workers.main import run_worker
    from workers.settings import WorkerSettings

    _logging(log_level)
    if die_with_parent:
        arm()
    run_worker(WorkerSettings(), burst=burst, name=name)


@app.command()
def models() -> None:
    """List the models in the local registry."""
    from models.manifest import CardIndex
    from workers.settings import CommonSettings

    index = CardIndex.default([CommonSettings().models_root])
    table = Table("name", "version", "architecture", "clean accuracy")
    for name in index.names():
        card = index.card(name)
        if card is not None:
            accuracy = card.metrics.get("clean_accuracy")
            table.add_row(card.name, str(card.version), card.architecture,
                          f"{accuracy:.4f}" if accuracy is not None else "-")
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
