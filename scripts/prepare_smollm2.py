"""Convert the embedded SmolLM2-135M-Instruct GGUF into an fp32 HF checkpoint (run once by `make model`)."""

import argparse
import logging
from pathlib import Path

from owlore.assets import embedded_model_path

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=None, help="target directory (default .cache/models/...)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache = args.output.parent if args.output else None
    print(embedded_model_path(cache))
