"""The frozen text encoder on one product's text: onnxruntime fp32 against int8 (dynamic quantization).

The service runs the e5 encoder on every new product's text, and that is the
largest part of one product's time (see RESULTS.md section 17). This measures
what the int8 encoder would save, and how far its states move, before anyone
refits heads on them: for ``--texts`` demo products, the text the bundle's BERT
member reads (prepared as the service prepares it, with the member's prefix),
tokenized as :func:`stackcat.features.text_states.token_states` does, run one
at a time on one thread through both sessions (interleaved, so both see the same
load), with the CPU and wall time of each run and the cosine between the
mean-pooled states. The int8 copy is written to a temporary folder (the
checkpoint's ``.onnx`` cache is left as it is).

    python experiments/bench_text_int8.py artifacts/demo-bundle --texts 100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a bundle or run folder with a frozen-encoder BERT member")
    parser.add_argument("--member", default="bert")
    parser.add_argument("--texts", type=int, default=100)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from stackcat.demo import load_demo
    from stackcat.features import onnx_backend
    from stackcat.features.hub import tokenize
    from stackcat.features.text_states import _checkpoint_folder, text_model_identity, token_states
    from stackcat.predictor import Predictor

    predictor = Predictor.load(args.model, trusted=True)
    member = predictor.stack._model(predictor.stack.fold_models_[args.member][0])
    raw, _ = load_demo()
    frame = predictor.prepare(raw.sample(n=args.texts, random_state=11).drop(columns=["image_path"])).frame
    texts = member._texts(frame)
    max_length = int(member.max_length_)
    token_states(texts[:1], member.model_name, max_length, progress=False)  # exports the fp32 file if needed
    folder = _checkpoint_folder(member.model_name)
    fp32, _ = onnx_backend.exported_model(onnx_backend.onnx_folder(folder),
                                          f"text\0{text_model_identity(member.model_name)}",
                                          lambda path: {}, int8=False)
    int8 = Path(tempfile.mkdtemp(prefix="e5-int8-")) / "model.onnx"
    began = time.perf_counter()
    onnx_backend._quantize(fp32, str(int8))
    quantize_s = time.perf_counter() - began
    sessions = {"fp32": onnx_backend.inference_session(fp32, 1), "int8": onnx_backend.inference_session(int8, 1)}
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tokenize(tokenizer, texts, max_length)
    wall = {name: [] for name in sessions}
    cpu = {name: [] for name in sessions}
    cosines = []
    for row in ids:
        feed = {"input_ids": np.asarray([row], dtype=np.int64), "attention_mask": np.ones((1, len(row)), np.int64)}
        pooled = {}
        for name, session in sessions.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            pooled[name] = session.run(None, feed)[0][0].mean(axis=0)
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
        a, b = pooled["fp32"], pooled["int8"]
        cosines.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    report = {"model": args.model, "member": args.member, "texts": len(ids), "max_length": max_length,
              "tokens_mean": round(float(np.mean([len(r) for r in ids])), 1), "quantize_s": round(quantize_s, 1),
              "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
              **{f"{name}_ms": {"cpu_p50": round(1000 * float(np.median(cpu[name])), 2),
                                "wall_p50": round(1000 * float(np.median(wall[name])), 2)} for name in sessions},
              "cosine_fp32_int8": {"min": round(min(cosines), 4), "median": round(float(np.median(cosines)), 4)},
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(report, indent=2))
    int8.unlink()


if __name__ == "__main__":
    main()
