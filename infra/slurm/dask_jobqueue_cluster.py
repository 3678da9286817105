"""Start a Dask cluster on SLURM with dask-jobqueue and keep it up for `compressor`.

Each SLURM job runs one Dask worker process with one thread (and one GPU with ``--gpu``); the
scheduler runs in this process, so run it on a login/head node that compute nodes can
reach, and keep it running (tmux/screen) while `compressor compress` uses it::

    pip install dask-jobqueue
    python infra/slurm/dask_jobqueue_cluster.py --jobs 8 --gpu \\
        --partition gpu --account myproj --address-file ~/compress-scheduler.txt
    # in another shell, with the address it printed:
    compressor compress /shared/ckpt/in /shared/ckpt/out --preset w4a16 \\
        --scheduler tcp://10.0.0.5:8786 --staging /shared/compress-staging

Workers on several nodes need a staging directory on shared storage (NFS, Lustre,
GPFS or an s3:// URL): pass ``--staging`` accordingly. Jobs start workers with the
Python that runs this script, so use a virtualenv that compute nodes see at the same
path (or activate one with ``--prologue``). ``--dry-run`` only prints the job script.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

DASK_SCHEDULER_PORT = 8786
DASK_DASHBOARD_PORT = 8787


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=4, help="number of SLURM jobs (= workers)")
    p.add_argument("--adapt-max", type=int, default=0, help="adaptive scaling up to N jobs")
    p.add_argument("--cpus", type=int, default=8, help="CPU cores requested per job")
    p.add_argument("--memory", default="64GiB", help="memory per job (all workers of a job)")
    p.add_argument("--processes", type=int, default=1, help="Dask worker processes per job")
    p.add_argument("--gpu", action="store_true", help="one GPU per job (worker declares GPU=1)")
    p.add_argument("--walltime", default="04:00:00")
    p.add_argument("--partition", default=None, help="SLURM partition (queue)")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--interface", default=None, help="network interface for Dask comms, e.g. ib0")
    p.add_argument("--local-directory", default="$TMPDIR", help="node-local spill directory")
    p.add_argument("--log-directory", default="dask-logs")
    p.add_argument(
        "--prologue",
        action="append",
        default=[],
        help="shell line run before the worker, e.g. 'source ~/venvs/compressor/bin/activate'",
    )
    p.add_argument("--scheduler-port", type=int, default=DASK_SCHEDULER_PORT, help="0: any")
    p.add_argument("--dashboard-port", type=int, default=DASK_DASHBOARD_PORT, help="0: any")
    p.add_argument("--address-file", type=Path, default=None, help="write the address here")
    p.add_argument("--wait-workers", type=int, default=1, help="wait for N workers (0: no)")
    p.add_argument("--dry-run", action="store_true", help="print the job script and exit")
    return p.parse_args(argv)


def make_cluster(args: argparse.Namespace):
    from dask_jobqueue import SLURMCluster

    job_extra_directives: list[str] = []
    worker_extra_args: list[str] = []
    if args.gpu:
        # One GPU and one worker process per job: worker processes of one job would all
        # see every GPU of the job. More GPUs = more jobs. The pipeline pins
        # compress/stats tasks to workers that declare the GPU resource.
        if args.processes != 1:
            raise SystemExit("--gpu needs --processes 1 (one worker per GPU)")
        job_extra_directives += ["--gres=gpu:1"]
        worker_extra_args += ["--resources", "GPU=1"]

    return SLURMCluster(
        queue=args.partition,
        account=args.account,
        # one thread per worker process (like the compose/k8s workers): a task holds a
        # whole tensor chunk and torch uses the job's cores inside it.
        cores=args.processes,
        processes=args.processes,
        job_cpu=args.cpus,
        memory=args.memory,
        walltime=args.walltime,
        interface=args.interface,
        local_directory=args.local_directory,
        log_directory=args.log_directory,
        job_extra_directives=job_extra_directives,
        job_script_prologue=args.prologue,
        worker_extra_args=worker_extra_args,
        scheduler_options={
            "port": args.scheduler_port,
            "dashboard_address": f":{args.dashboard_port}",
        },
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = make_cluster(args)
    if args.dry_run:
        print(cluster.job_script())
        cluster.close()
        return 0

    if args.adapt_max:
        cluster.adapt(minimum_jobs=min(args.jobs, args.adapt_max), maximum_jobs=args.adapt_max)
    else:
        cluster.scale(jobs=args.jobs)

    address = cluster.scheduler_address
    if args.address_file:
        args.address_file.write_text(address + "\n")
    print(f"scheduler: {address}")
    print(f"dashboard: {cluster.dashboard_link}")

    if args.wait_workers:
        from distributed import Client

        with Client(cluster) as client:
            print(f"waiting for {args.wait_workers} worker(s) ...", flush=True)
            client.wait_for_workers(args.wait_workers)

    print(
        "run:  compressor compress SRC DST --preset w4a16 "
        f"--scheduler {address} --staging /shared/compress-staging",
        flush=True,
    )
    print("Ctrl-C (or SIGTERM) stops the cluster and cancels its jobs.", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
