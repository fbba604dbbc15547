"""An S3 endpoint for the benchmarks: moto's server in a process of its own (as MinIO would be),
so that it does not share the measured process's interpreter."""

from __future__ import annotations

import socket
import subprocess
import sys
import time


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
