"""Fill the feature-map cache of the image top-block tune, timed; and the frozen part under PyTorch vs onnxruntime.

    nice -n 19 python experiments/image_top_blocks_cache.py efficientnet-lite0 1 \\
        --data ../shared/data/myntra --cache-dir artifacts/imgtune_cache

First encodes the first 256 photos of the Myntra image subset into the maps entering
the last k blocks with ``backend="torch"`` then ``"onnx"`` (wall and CPU seconds, the
largest difference between the two), then caches the maps of every photo and of its
mirror image (float16, as ``ImageEmbeddingClassifier(tune_top_blocks=k)`` reads them)
into ``--cache-dir``, printing wall and CPU seconds of each pass as JSON lines.
experiments/image_top_blocks_myntra.py then finds them there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from image_encoders_myntra import image_subset
from PIL import Image

from stackcat.features.image_encoders import (
    EfficientNetLiteBlockInputs,
    MirroredEncoder,
    get_encoder,
)
from stackcat.features.images import image_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=["efficientnet-lite0", "efficientnet-lite2"])
    parser.add_argument("k", type=int)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/myntra"))
    parser.add_argument("--cache-dir", type=Path, default=Path("artifacts/imgtune_cache"))
    args = parser.parse_args()
    paths = image_subset(args.data)["image_path"].tolist()
    sample = [Image.open(p).convert("RGB") for p in paths[:256]]
    outputs = {}
    for backend in ("torch", "onnx"):
        block_inputs = EfficientNetLiteBlockInputs(get_encoder(args.variant, device="cpu", backend=backend), args.k)
        block_inputs.encode(sample[:8])  # load / export outside the clock
        start, cpu = time.perf_counter(), time.process_time()
        outputs[backend] = block_inputs.encode(sample)
        print(json.dumps({"backend": backend, "images": len(sample), "wall": round(time.perf_counter() - start, 1),
                          "cpu": round(time.process_time() - cpu, 1)}), flush=True)
    print(json.dumps({"max_abs_difference": float(np.abs(outputs["onnx"] - outputs["torch"]).max()),
                      "max_abs_value": float(np.abs(outputs["torch"]).max())}), flush=True)
    block_inputs = EfficientNetLiteBlockInputs(get_encoder(args.variant), args.k)
    for encoder in (block_inputs, MirroredEncoder(block_inputs)):
        start, cpu = time.perf_counter(), time.process_time()
        maps = image_embeddings(paths, encoder, cache_dir=args.cache_dir, dtype=np.float16, progress=False)
        print(json.dumps({"encoder": encoder.name, "rows": len(paths), "ok": int(maps.ok.sum()),
                          "wall": round(time.perf_counter() - start, 1), "cpu": round(time.process_time() - cpu, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
