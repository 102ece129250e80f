"""Container healthchecks; exit 0 when healthy, else 1 with the reason on stderr.

python deploy/healthcheck.py http://127.0.0.1:8000/readyz [--timeout 4]
    GET URL answers 200 (standard library only: the image has no curl).
python deploy/healthcheck.py --ray-worker NODE_IP HEAD_IP:GCS_PORT [--timeout 4]
    The Ray cluster whose GCS is at HEAD_IP:GCS_PORT has a live worker node (not the head) at NODE_IP: this host's
    `ray start` has joined, not merely reached the head. Uses RAY_AUTH_TOKEN like every Ray client.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def check_url(url: str, timeout: float) -> str | None:
    """None if GET url answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (the operator's own URL)
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (e.g. 503 while loading) is a URLError
        return f"{url}: {exc}"


def check_ray_worker(node_ip: str, gcs_address: str, timeout: float) -> str | None:
    """None if a live non-head node at node_ip is registered with the GCS at gcs_address, else why not."""
    # Ray's GCS client (as `ray health-check` uses it); ray is pinned, and tests/test_deploy.py runs this check.
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    try:
        nodes = GcsClient(address=gcs_address).get_all_node_info(timeout=timeout).values()
    except Exception as exc:  # unreachable, wrong token, timeout: Ray raises its own exception types
        return f"GCS {gcs_address}: {type(exc).__name__}: {exc}"
    for node in nodes:
        alive = node.state == GcsNodeInfo.GcsNodeState.ALIVE
        if alive and not node.is_head_node and node.node_manager_address == node_ip:
            return None
    return f"no live worker node at {node_ip} in the cluster of {gcs_address} ({len(nodes)} nodes known)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "target", help="http(s) URL that must answer 200, or with --ray-worker the GCS address"
    )
    parser.add_argument(
        "--ray-worker", metavar="NODE_IP", help="check that a Ray worker node at NODE_IP is alive"
    )
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    if args.ray_worker:
        problem = check_ray_worker(args.ray_worker, args.target, args.timeout)
    else:
        problem = check_url(args.target, args.timeout)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
