"""Run the per-patient audit on a dask.distributed cluster: a LocalCluster on 127.0.0.1 or a given scheduler."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

from assistant.audit.unit import AuditOptions, Judgement, ResultSink, Unit, run_unit

log = logging.getLogger(__name__)


def run_dask(
    units: Iterator[Unit],
    judgement: Judgement,
    options: AuditOptions,
    sink: ResultSink,
    *,
    processes: bool = True,
) -> None:
    """Submit batches with a bounded window and hand results to `sink` as they complete (streaming).

    The same `run_unit` as the local engine runs on the workers, so the findings are identical. Partition units
    name files on this machine: a remote scheduler's workers must share the filesystem.
    """
    from dask.distributed import Client, LocalCluster, as_completed

    if not log.isEnabledFor(logging.INFO):
        logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO chatter is not for the nurse
    cluster = None
    if options.scheduler:
        client = Client(options.scheduler, timeout="30s")
    else:
        processes = getattr(options, "dask_processes", processes)
        # Loopback only, and no dashboard: nothing listens beyond this machine.
        # Worker threads talk in-process (no sockets at all); worker processes over tcp on 127.0.0.1.
        network = {"host": "127.0.0.1"} if processes else {}
        cluster = LocalCluster(
            n_workers=max(1, options.workers),
            threads_per_worker=1,
            processes=processes,
            dashboard_address=None,
            silence_logs=logging.WARNING,
            **network,
            scheduler_kwargs={"dashboard": False, "http_prefix": None},
            worker_dashboard_address=None,
        )
        client = Client(cluster)
    token = uuid.uuid4().hex[:8]
    try:
        workers = max(1, len(client.scheduler_info().get("workers", {})) or options.workers)
        window = workers * 2
        pending = as_completed()
        in_flight = 0
        for unit in units:
            fut = client.submit(
                run_unit,
                unit,
                judgement,
                options.catalogue_path,
                key=f"nva-audit-{token}-{unit.index}",
                pure=False,
            )
            pending.add(fut)
            in_flight += 1
            if in_flight >= window:
                done = next(pending)
                sink(*done.result())
                done.release()
                in_flight -= 1
        for done in pending:
            sink(*done.result())
            done.release()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
