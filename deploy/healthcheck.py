"""Container healthcheck: exit 0 when GET URL answers 200, else 1. Standard library only (no curl in the image).

python deploy/healthcheck.py http://127.0.0.1:8000/readyz [--timeout 4]
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="http(s) URL that must answer 200")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as response:  # noqa: S310 (fixed local URL)
            healthy = response.status == 200
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (e.g. 503 while loading) is a URLError
        print(f"unhealthy: {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
