"""Start a worker: the embedded broker when none is configured, topics, catalog, Faust."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prefstream.datadir import check_writable
from prefstream.errors import BrokerError
from prefstream.logs import faust_logging_config
from prefstream.settings import Settings
from prefstream.storage.catalog import ensure_catalog
from prefstream.storage.files import init_data_dir
from prefstream.storage.quarantine import quarantined
from prefstream.storage.repair import repair_data_dir
from prefstream.streams.broker import KAFKA_PORT, EmbeddedBroker, preferred_port
from prefstream.streams.producer import answers
from prefstream.streams.worker import logscrub
from prefstream.streams.worker.gctune import tune_gc
from prefstream.streams.worker.topics import ensure_topics

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

#: files and folders a worker or demo process creates are owner-only (Faust's files, the
#: watermarks, the catalog, logs): the data dir holds user content
OWNER_ONLY_UMASK = 0o077


@contextlib.contextmanager
def broker_for(settings: Settings, *, log_path: Path | None = None,
               port: int | None = None) -> Iterator[Settings]:
    """Yield settings with a bootstrap server: the configured Kafka, or an embedded Tansu (on
    ``port``, else a free one)."""
    if settings.kafka_bootstrap:
        yield settings
        return
    with EmbeddedBroker(log_path=log_path, port=port) as broker:
        yield settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})


def prepare(settings: Settings) -> None:
    """Idempotent set-up shared by the worker and the demo; first the checks of what a user
    gave (a writable data dir, a broker that answers), so bad usage creates nothing; then
    damaged files set aside and a killed writer's temporary files removed before the
    catalog is written."""
    check_writable(settings.data_dir, needed_by="the worker")
    servers = str(settings.kafka_bootstrap).split(",")
    if not any(answers(server, timeout_s=2.0) for server in servers):
        raise BrokerError(f"no Kafka broker answers at {settings.kafka_bootstrap} "
                          "(--kafka-bootstrap or PREFSTREAM_KAFKA_BOOTSTRAP)")
    init_data_dir(settings.data_dir)
    repair_data_dir(settings.data_dir)
    ensure_catalog(settings.data_dir)
    ensure_topics(settings)


def _embedded_banner(bootstrap: str) -> str:
    port = bootstrap.rsplit(":", 1)[1]
    note = "" if port == str(KAFKA_PORT) else f" ({KAFKA_PORT} was taken)"
    return (f"embedded Kafka broker listening on localhost:{port}{note}; producers: "
            f'FeedbackProducer("localhost:{port}"); stop with Ctrl-C')


def faust_worker(app: faust.App, settings: Settings, loglevel: str) -> faust.Worker:
    """Faust's worker for ``app``, logging at ``loglevel``, without its terminal spinner.

    At WARNING and above Faust's worker spins a spinner on every log record: it sets the root
    logger to DEBUG for the whole run, so every debug call of Faust and aiokafka (several per
    message sent) builds a record that no handler prints: about 4% of the agent's CPU."""
    import faust

    worker = faust.Worker(app, loglevel=loglevel, quiet=True,
                          logging_config=faust_logging_config(settings.log_format, loglevel))
    worker.spinner = None
    return worker


def run_worker(settings: Settings, *, loglevel: str = "info") -> int:
    """Run one worker until SIGTERM/SIGINT; returns the process exit code."""
    from prefstream.storage.tables import memory_pool, warm_up
    from prefstream.streams.worker.app import create_app
    from prefstream.streams.worker.consumer import quiet_abandoned_commits

    if memory_pool() == "mimalloc" and not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        log.warning("pyarrow's memory pool is mimalloc: a long-running worker's memory grows "
                    "with it; start workers with ARROW_DEFAULT_MEMORY_POOL=jemalloc")
    logscrub.install(settings.text_storage)  # before Faust logs a payload
    quiet_abandoned_commits()
    warm_up()
    os.umask(OWNER_ONLY_UMASK)
    check_writable(settings.data_dir, needed_by="the worker")  # before starting any broker
    embedded = not settings.kafka_bootstrap
    with broker_for(settings, port=preferred_port() if embedded else None) as settings:
        prepare(settings)
        if embedded:  # on stdout, apart from the logs: what a producer needs to know
            print(_embedded_banner(str(settings.kafka_bootstrap)), flush=True)
        log.info("worker on Kafka %s, data in %s", settings.kafka_bootstrap, settings.data_dir)
        app = create_app(settings)
        app.pipeline.metrics.set(  # type: ignore[attr-defined]
            "prefstream_files_quarantined", len(quarantined(settings.data_dir)))
        worker = faust_worker(app, settings, loglevel)
        tune_gc()
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
    return 0
