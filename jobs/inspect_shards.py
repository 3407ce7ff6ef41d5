"""Look at shards before training: a static HTML page per shard folder (mvcustom.data.inspector).

python -m jobs.inspect_shards SHARDS_URL [SHARDS_URL ...] [--samples N] --out DIR

SHARDS_URL: a shard folder, a glob or tar URLs (any fsspec URL: local, s3://, gs://). Each page
shows the folder's manifest and error summary and, for N sampled clips, frames, depth, masks,
caption, pose source and quality, and the camera frusta. Prints the pages' paths.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", nargs="+", help="shard folder(s), glob(s) or tar URL(s)")
    ap.add_argument("--samples", type=int, default=4, help="clips shown per folder (default 4)")
    ap.add_argument("--out", required=True, help="output folder (fsspec URL) for the pages")
    args = ap.parse_args(argv)
    if args.samples < 0:
        ap.error(f"--samples must be >= 0, got {args.samples}")

    from mvcustom.data.inspector import inspect_shards

    pages = inspect_shards(args.shards, args.out, args.samples)
    for page in pages:
        print(f"shard inspector: {page}", flush=True)
    return pages


if __name__ == "__main__":
    main()
