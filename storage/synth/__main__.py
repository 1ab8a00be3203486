"""`python -m storage.synth`: write the synthetic P-VLG benchmark (see storage.synth.generate).

python -m storage.synth --out DIR --identities 2500 --images-per-id 4 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys

from storage.synth.generate import generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m storage.synth",
        description="Write the synthetic P-VLG benchmark (drawn pedestrians, long captions, region ground truth).",
    )
    parser.add_argument("--out", required=True, help="output directory (must be empty, or see --overwrite)")
    parser.add_argument("--identities", type=int, required=True, help="number of identities (>= 1)")
    parser.add_argument("--images-per-id", type=int, required=True, help="images per identity (>= 1)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--test-fraction", type=float, default=0.25, help="share of identities in the test split"
    )
    parser.add_argument("--width", type=int, default=128, help="image width, pixels")
    parser.add_argument("--height", type=int, default=256, help="image height, pixels")
    parser.add_argument("--captions-per-image", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a previous synthetic benchmark in --out"
    )
    args = parser.parse_args(argv)
    try:
        summary = generate(
            args.out,
            args.identities,
            args.images_per_id,
            args.seed,
            test_fraction=args.test_fraction,
            width=args.width,
            height=args.height,
            captions_per_image=args.captions_per_image,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
