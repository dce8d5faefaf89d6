"""`generate --finalize` against an S3-protocol server: receipts verified per second, pooled vs one at a time.

    python bench/finalize.py --json bench/results/finalize.json      # make bench runs this (needs moto[server])

A moto server on 127.0.0.1 holds one generation job's shards and receipts (the untrained generator of
configs/gan_fashion.yaml, tiny shards, so the set is many objects and few bytes). finalize() then
checks every shard against its receipt (receipt read, shard's sha256 re-computed, each a round trip on S3)
and writes the manifest: once with its bounded pool (FINALIZE_THREADS in flight) and once with one thread,
as the job did before; alternating, best of --repeats. ratio = pooled / one at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, report  # noqa: E402
from bench.generate import untrained_export  # noqa: E402
from tests.s3server import BUCKET, MotoServer, aws_env, clear_fsspec_cache  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=1000, help="shards (and receipts) in the set")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = MotoServer.start(Path(tmp))
        try:
            os.environ.update(aws_env(server.endpoint))
            clear_fsspec_cache()
            import boto3

            boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                         aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
            import gensynth.generate.job as job_module
            from gensynth.generate.job import generate

            export = str(untrained_export(str(REPO / "configs" / "gan_fashion.yaml"), Path(tmp) / "export"))
            out = f"s3://{BUCKET}/finalize"
            started = time.perf_counter()
            generate(export, out, num=2 * args.shards, shard_size=2, tasks=2, task=0)
            generate(export, out, num=2 * args.shards, shard_size=2, tasks=2, task=1)
            print(f"wrote {args.shards} shards and receipts to the moto server in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            pooled_threads = job_module.FINALIZE_THREADS
            rates: dict[str, list[float]] = {"pooled": [], "one": []}
            for _ in range(args.repeats):
                for name, threads in (("pooled", pooled_threads), ("one", 1)):
                    job_module.FINALIZE_THREADS = threads
                    start = time.perf_counter()
                    result = generate(export, out, num=2 * args.shards, shard_size=2, tasks=2, finalize=True)
                    rates[name].append(args.shards / (time.perf_counter() - start))
                    assert result.manifest is not None and len(result.manifest.shards) == args.shards
                    print(f"  {name:6s} {rates[name][-1]:8.1f} receipts/s", flush=True)
            job_module.FINALIZE_THREADS = pooled_threads
        finally:
            server.stop()
    best = {name: max(values) for name, values in rates.items()}
    ratio = best["pooled"] / best["one"]
    result = {"protocol": {**machine(), "shards": args.shards, "samples_per_shard": 2, "repeats": args.repeats,
                           "server": "moto_server on 127.0.0.1", "pooled_threads": pooled_threads,
                           "statistic": "best of alternating repeats; each run includes loading the export and "
                                        "writing the manifest"},
              "receipts_per_s": best, "runs": rates, "ratio": ratio}
    report(result, "receipts/s", [(f"finalize, {pooled_threads} in flight", f"{best['pooled']:,.1f}"),
                                  ("finalize, one at a time", f"{best['one']:,.1f}")],
           f"ratio pooled / one at a time {ratio:.2f}; at this rate 10^5 receipts take "
           f"{1e5 / best['pooled'] / 60:.1f} min", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
