"""An S3 endpoint for the benchmarks: moto's server in a process of its own (as MinIO would be),
so that it does not share the measured process's interpreter."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


def moto_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port, with a bucket 'lake'; the process and its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="lake")
            return proc, endpoint
        except Exception:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto's S3 server did not start")


def latency_proxy(upstream: str, latency_ms: float) -> tuple[subprocess.Popen, str]:
    """tests/s3proxy.py in a process of its own in front of `upstream`, adding `latency_ms` to every request and
    failing none; the process and its endpoint URL."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from s3proxy import FaultyS3Proxy; "
              "p = FaultyS3Proxy(sys.argv[2], fail=0, latency=float(sys.argv[3]) / 1000).start(); "
              "print(p.endpoint, flush=True); time.sleep(1e9)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tests), upstream, str(latency_ms)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    endpoint = proc.stdout.readline().strip()
    if not endpoint.startswith("http://"):
        proc.kill()
        raise RuntimeError("the latency proxy did not start")
    return proc, endpoint
