"""``pipeline-sync RUN_DIR``: upload what a run's tracking spool holds and the server has not
acknowledged (a server that was down when the run ended). Idempotent: a second run sends nothing.

Exit status: 0 everything is uploaded, 1 the server is still unreachable (what was sent stays
acknowledged; run it again later), 2 nothing to sync here or another process is uploading.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.tracking_spool import TrackingSpool, spool_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Upload a run's tracking records kept on disk to MLflow.")
    parser.add_argument("run_dir", type=Path, help="the run directory (or its tracking/ spool directory)")
    parser.add_argument("--tracking-uri", help="another server than the one the run logged to (the run is created there)")
    parser.add_argument("--request-timeout", type=int, default=30, help="seconds one request may take (default 30)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    spool = TrackingSpool(spool_dir(args.run_dir))
    if not spool.exists():
        print(f"pipeline-sync: no tracking spool in {args.run_dir}", file=sys.stderr)
        return 2
    if not spool.try_lock():
        print(f"pipeline-sync: another process (the training?) is uploading {spool.directory}", file=sys.stderr)
        return 2
    state = spool.run_state()
    uri = args.tracking_uri or state["tracking_uri"]
    left = spool.count_pending()
    if left == 0:  # before importing mlflow: a second sync costs nothing
        print(f"nothing to upload: every record of {spool.directory} is in MLflow run {state.get('run_id')} at {uri}")
        return 0

    from pipeline.tracking_upload import Uploader, configure_http

    configure_http(args.request_timeout)
    uploader = Uploader(spool, uri)
    try:
        uploader.upload()
    except Exception as exn:
        sent = ", ".join(f"{n} {what}" for what, n in uploader.sent.items()) or "nothing"
        left = spool.count_pending()
        print(f"pipeline-sync: {uri} failed after sending {sent}: {exn}\n"
              f"{left} records left in {spool.directory}; run this again later", file=sys.stderr)  # fmt: skip
        return 1
    sent = uploader.sent
    print(f"uploaded {sent['records']} records ({sent['metric points']} metric points, {sent['artifacts']} artifacts"
          f"{', ' + str(sent['skipped']) + ' refused by the server' if sent['skipped'] else ''}) "
          f"to MLflow run {spool.run_state()['run_id']} at {uri}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
