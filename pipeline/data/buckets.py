"""Aspect-ratio buckets (`ingest.buckets`), as Stable Diffusion trainers (kohya-ss sd-scripts, SimpleTuner) use
them: instead of centre-cropping every image to the square R x R, each image is prepared at the bucket whose
aspect ratio is closest to its own. Every bucket has about the square's area (the pixel budget R x R), so a
batch of any bucket costs about the same to train on.
"""

from __future__ import annotations

import math

from pipeline.config import BucketConfig
from pipeline.errors import UserError


def bucket_sizes(resolution: int, cfg: BucketConfig) -> list[tuple[int, int]]:
    """Every (width, height), sorted, with both sides multiples of `cfg.step` between step and max_side, an area
    of at most resolution^2 and an aspect ratio of at most max_aspect; per width the largest height that fits.
    Always holds the square (resolution, resolution); a config that cannot is a UserError naming the keys."""
    step, max_side = cfg.step, cfg.max_side or 2 * resolution
    if resolution % step:
        divisors = [d for d in (64, 32, 16, 8, 4) if resolution % d == 0]
        hint = f" (e.g. {divisors[0]})" if divisors else ""
        raise UserError(f"ingest.buckets.step ({step}) does not divide the resolution ({resolution}), so the "
                        f"square {resolution}x{resolution} is no bucket: set ingest.buckets.step to a divisor of "
                        f"{resolution}{hint}, or the resolution (--resolution, data.resolution) to a multiple of "
                        f"{step}")
    if max_side < resolution:
        raise UserError(f"ingest.buckets.max_side ({max_side}) is below the resolution ({resolution}), so the "
                        f"square {resolution}x{resolution} is no bucket: raise ingest.buckets.max_side (default: "
                        "2 x resolution)")
    budget = resolution * resolution
    sizes = []
    for width in range(step, max_side + 1, step):
        height = min(budget // width, max_side) // step * step
        if height >= step and max(width, height) / min(width, height) <= cfg.max_aspect:
            sizes.append((width, height))
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height in log space (a 2:1 image is as far from the
    square as a 1:2 one); ties go to the first in `buckets`."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))
