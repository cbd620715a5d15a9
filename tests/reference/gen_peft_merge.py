#!/usr/bin/python3
"""Torch oracle for MergeExport's merge (tests/NativePeft.Tests/IO/MergeExportTests.cs).

Writes tests/NativePeft.Tests/Data/peft_merge.safetensors: a base weight W [out, in], lora_A [r, in] and
lora_B [out, r] (float32, from torch.manual_seed), and PEFT's merge of them, computed as PEFT's
lora.Linear.merge / get_delta_weight do: delta = (B @ A) * scaling, W + delta in float32, then the float32 result
rounded by torch to bfloat16 and float16. Two cases: plain LoRA (scaling = lora_alpha / r) and rsLoRA
(scaling = lora_alpha / sqrt(r)); lora_alpha = 7, r = 3 so that the scaling is not a power of two.
The safetensors file is written by hand (the format of docs/formats.md), since the safetensors package is not installed.

Run: /usr/bin/python3 tests/reference/gen_peft_merge.py   (torch 1.13)
"""
import json
import math
import os
import struct

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "NativePeft.Tests", "Data", "peft_merge.safetensors")
OUT_F, IN_F, R, ALPHA = 24, 40, 3, 7


def to_bytes(t):
    if t.dtype == torch.bfloat16:
        return "BF16", t.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    if t.dtype == torch.float16:
        return "F16", t.contiguous().numpy().astype("<f2").tobytes()
    return "F32", t.contiguous().numpy().astype("<f4").tobytes()


def write(path, tensors, metadata):
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, t in tensors:
        dtype, data = to_bytes(t)
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    print(os.path.normpath(path), os.path.getsize(path), "bytes")


torch.manual_seed(1234)
w = torch.randn(OUT_F, IN_F, dtype=torch.float32) * 0.05
a = (torch.rand(R, IN_F, dtype=torch.float32) * 2 - 1) / math.sqrt(IN_F)   # Kaiming-uniform range
b = torch.randn(OUT_F, R, dtype=torch.float32) * 0.3                          # a trained (non-zero) B
tensors = [("weight", w), ("lora_A", a), ("lora_B", b)]
for tag, scaling in (("lora", ALPHA / R), ("rslora", ALPHA / math.sqrt(R))):
    delta = (b @ a) * scaling            # get_delta_weight: (weight_B @ weight_A) * scaling, float32
    merged = w.clone()
    merged += delta                      # merge(): base_layer.weight.data += delta_weight
    tensors += [(f"{tag}.merged_f32", merged), (f"{tag}.merged_bf16", merged.to(torch.bfloat16)),
                (f"{tag}.merged_f16", merged.to(torch.float16))]
write(OUT, tensors, {"format": "pt", "r": str(R), "lora_alpha": str(ALPHA), "torch": torch.__version__})
