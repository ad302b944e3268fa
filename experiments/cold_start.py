"""Where a served bundle's cold start goes: imports, loading the bundle, the warm-up prediction's parts.

Run in a fresh interpreter (each figure is a first time in this process):

1. importing torch, scikit-learn, pandas, transformers (wall seconds each, in that order: a
   later one does not count what an earlier one already imported);
2. ``Predictor.load`` of the bundle;
3. the frozen text encoder's parts that the first prediction pays for: the checkpoint
   folder's identity (hashing its files), the tokenizer through ``AutoTokenizer`` and,
   for comparison, straight from its ``tokenizer.json`` (``PreTrainedTokenizerFast``; both
   tokenize the demo's texts to the same ids or the script says so), the onnxruntime
   session of the exported graph;
4. then the warm-up prediction of ``stackcat serve`` (``warm_up``): it makes the library's own
   tokenizer and sessions (text and image encoders), with the imports and the folder hash
   above already paid.

    python experiments/cold_start.py artifacts/demo-bundle
"""

from __future__ import annotations

import argparse
import json
import os
import time

START = time.perf_counter()


def timed(what: str, figures: dict, action):
    began = time.perf_counter()
    result = action()
    figures[what] = round(time.perf_counter() - began, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--member", default="bert", help="the member whose frozen text encoder is timed")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    timed("import torch", figures, lambda: __import__("torch"))
    timed("import sklearn (base, linear_model)", figures, lambda: __import__("sklearn.linear_model"))
    timed("import pandas", figures, lambda: __import__("pandas"))
    timed("import transformers (AutoTokenizer)", figures,
          lambda: __import__("transformers", fromlist=["AutoTokenizer"]).AutoTokenizer)

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from stackcat.demo import load_demo
    from stackcat.features import onnx_backend
    from stackcat.features.text_states import _checkpoint_folder, text_model_identity
    from stackcat.predictor import Predictor
    from stackcat.serve.server import warm_up

    figures["imports before loading, in all"] = round(time.perf_counter() - START, 2)
    predictor = timed("Predictor.load", figures, lambda: Predictor.load(args.model, trusted=True))
    member = predictor.stack._model(predictor.stack.fold_models_[args.member][0])
    folder = _checkpoint_folder(member.model_name)
    identity = timed("text encoder folder identity (hash)", figures, lambda: text_model_identity(member.model_name))
    auto = timed("tokenizer: AutoTokenizer.from_pretrained", figures,
                 lambda: AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    fast = timed("tokenizer: PreTrainedTokenizerFast(tokenizer_file)", figures, lambda: PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), pad_token=config.get("pad_token"),
        model_max_length=config.get("model_max_length")))
    raw, _ = load_demo()
    texts = member._texts(predictor.prepare(raw.drop(columns=["image_path"])).frame)
    same = all(auto(texts, truncation=True, max_length=n)["input_ids"]
               == fast(texts, truncation=True, max_length=n)["input_ids"] for n in (int(member.max_length_), 512))
    path, _ = onnx_backend.exported_model(onnx_backend.onnx_folder(folder), f"text\0{identity}", lambda p: {},
                                          int8=False)
    onnx_backend.clear_sessions()
    timed("onnxruntime session of the text encoder (1 thread)", figures,
          lambda: onnx_backend.inference_session(path, 1))
    onnx_backend.clear_sessions()
    timed("warm-up prediction (stackcat serve's)", figures, lambda: warm_up(predictor))
    figures["total"] = round(time.perf_counter() - START, 2)
    print(json.dumps({"model": args.model, "seconds": figures, "tokenizers_give_the_same_ids": same,
                      "texts_compared": len(texts), "load_average": [round(x, 2) for x in os.getloadavg()]},
                     indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
