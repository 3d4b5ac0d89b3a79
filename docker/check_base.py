"""Build-time guard of docker/pipeline.Dockerfile: the base image must carry Python 3.11 and the torch version
pinned in constraints.txt (the CUDA build of it), or the build stops here with a clear message."""

import sys

import torch

pinned = next(line.split("==")[1].strip() for line in open(sys.argv[1]) if line.startswith("torch=="))
have = torch.__version__.split("+")[0]
if sys.version_info[:2] != (3, 11) or have != pinned:
    sys.exit(f"base image has Python {sys.version.split()[0]} and torch {torch.__version__}; the project needs "
             f"Python 3.11 and torch {pinned} (constraints.txt): build with a matching --build-arg BASE_IMAGE=...")
print(f"base image: Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
