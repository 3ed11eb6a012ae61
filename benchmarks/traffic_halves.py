"""The traffic protocol's two files: part of the held-out texts as a user's traffic, the rest judged.

    python -m benchmarks.traffic_halves SHARE TRAFFIC JUDGED [--texts FILE]

Splits the held-out texts (workers/optimize `heldout_texts`: the built-in ones, or --texts) as the
benchmarks' --traffic-share does (`common.traffic_split`, by a hash of each text) and writes each
part as batch-input JSONL of moderation lines, which `gristmill optimize --distill` and `--texts`
read: `gristmill optimize MODEL --distill TRAFFIC --with-builtin N --cascade --texts JUDGED` then
plays a user who distils on a sample of their traffic and is judged on the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import request_line, traffic_split


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.traffic_halves", description=__doc__.split("\n\n")[0])
    ap.add_argument("share", type=float, help="the traffic's share of the texts, in (0, 1)")
    ap.add_argument("traffic", type=Path)
    ap.add_argument("judged", type=Path)
    ap.add_argument("--texts", type=Path, help="held-out texts (default: the built-in ones)")
    args = ap.parse_args(argv)
    if not 0 < args.share < 1:
        ap.error(f"the share must be in (0, 1), got {args.share}")
    from gristmill.workers.optimize import heldout_texts
    halves = traffic_split(heldout_texts(args.texts), args.share)
    for path, texts, tag in zip((args.traffic, args.judged), halves, ("traffic", "judged")):
        path.write_text("".join(request_line(f"{tag}-{i}", t, "/v1/moderations") + "\n" for i, t in enumerate(texts)),
                        encoding="utf-8")
        print(f"{path}: {len(texts)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
