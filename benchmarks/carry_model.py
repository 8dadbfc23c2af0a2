"""Shrink a Hugging Face model directory for the trip to the lent GPU machine, and restore it there.

The device tool carries at most 64 MiB with the working tree, and nothing can be
downloaded on that machine. all-MiniLM-L6-v2 is 87 MiB in float32: packed, it is
about 33 MiB. `pack` stores every large vocabulary matrix (a 2-D tensor of at least
`--min-rows` rows: the word embeddings) as int8 with one float32 scale per row, and
every other tensor as float16; `unpack` writes a float32 `model.safetensors` again
beside the same tokenizer and config files. The round trip changes a weight by at
most half an int8 step of its row (printed by `pack`), far below what fine-tuning
moves; the tokenizer is untouched, so prompts tokenize exactly as before.

    python benchmarks/carry_model.py pack   MODEL_DIR OUT_DIR
    python benchmarks/carry_model.py unpack PACKED_DIR MODEL_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

PACKED = "packed.safetensors"
RECORD = "packed.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def pack(model_dir: Path, out: Path, min_rows: int = 10_000) -> dict:
    from safetensors.numpy import load_file, save_file

    source = model_dir / "model.safetensors"
    if not source.exists():
        raise SystemExit(f"{model_dir}: no model.safetensors to pack")
    tensors = load_file(str(source))
    packed: dict[str, np.ndarray] = {}
    quantized, worst = [], 0.0
    for name, value in tensors.items():
        value = value.astype(np.float32)
        if value.ndim == 2 and value.shape[0] >= min_rows:
            scale = np.abs(value).max(axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.rint(value / scale), -127, 127).astype(np.int8)
            packed[f"{name}.int8"], packed[f"{name}.scale"] = q, scale.astype(np.float32)
            quantized.append(name)
            worst = max(worst, float(np.abs(q * scale - value).max()))
        else:
            packed[name] = value.astype(np.float16)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns(*WEIGHT_FILES, "onnx", "*.onnx"))
    save_file(packed, str(out / PACKED))
    record = {"quantized_int8": quantized, "max_abs_error_int8": worst, "tensors": len(tensors)}
    (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def unpack(packed_dir: Path, out: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    record = json.loads((packed_dir / RECORD).read_text())
    packed = load_file(str(packed_dir / PACKED))
    tensors: dict[str, np.ndarray] = {}
    for name in record["quantized_int8"]:
        tensors[name] = packed.pop(f"{name}.int8").astype(np.float32) * packed.pop(f"{name}.scale")
    tensors.update({name: value.astype(np.float32) for name, value in packed.items()})
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(packed_dir, out, ignore=shutil.ignore_patterns(PACKED, RECORD))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--min-rows", type=int, default=10_000, help="pack: quantize 2-D tensors with this many rows or more")
    args = p.parse_args(argv)
    if not (args.source / ("model.safetensors" if args.action == "pack" else RECORD)).exists():
        sys.exit(f"{args.source}: not a {'model' if args.action == 'pack' else 'packed model'} directory")
    if args.action == "pack":
        record = pack(args.source, args.out, args.min_rows)
        size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
        print(f"packed {args.source} -> {args.out}: {size / 2**20:.1f} MiB; int8: {record['quantized_int8']} "
              f"(largest change {record['max_abs_error_int8']:.2e})")
    else:
        print(f"unpacked {args.source} -> {unpack(args.source, args.out)}")


if __name__ == "__main__":
    main()
