#!/usr/bin/env python3
"""Compares two adapters (adapter_model.safetensors in two folders) tensor by tensor, with the standard library only.

    python3 compare_adapters.py A_DIR B_DIR [--rtol 1e-3]

Every tensor of A must be in B with the same dtype and shape (and no other tensor in B). A tensor passes when
max |a - b| <= rtol * max |a| (rtol 0 asks for bit-identical values). Prints one line per tensor that differs, then
"headline: ..." and PASS or FAIL; exits 0 on PASS, 1 on FAIL, 2 on unreadable input. gpu-check's `nccl` section runs
it on the 1-rank NCCL run's adapter against the plain run's (docs/distributed.md).
"""
import argparse
import json
import math
import os
import struct
import sys

DTYPES = {"F32": ("f", 4), "F64": ("d", 8), "BF16": (None, 2), "F16": ("e", 2)}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    base = 8 + n
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = meta["dtype"]
        if dtype not in DTYPES:
            raise ValueError(f"{path}: {name}: dtype {dtype} not supported here")
        fmt, size = DTYPES[dtype]
        start, end = meta["data_offsets"]
        raw = data[base + start:base + end]
        count = len(raw) // size
        if fmt is None:  # bf16: the high half of a float32
            halves = struct.unpack(f"<{count}H", raw)
            values = struct.unpack(f"<{count}f", struct.pack(f"<{count}I", *(h << 16 for h in halves)))
        else:
            values = struct.unpack(f"<{count}{fmt}", raw)
        tensors[name] = (dtype, tuple(meta["shape"]), values)
    return tensors


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=1e-3)
    args = p.parse_args()
    try:
        a = read_safetensors(os.path.join(args.a, "adapter_model.safetensors"))
        b = read_safetensors(os.path.join(args.b, "adapter_model.safetensors"))
    except (OSError, ValueError, KeyError, struct.error) as e:
        print(f"error: {e}")
        return 2
    ok = True
    if set(a) != set(b):
        print(f"FAIL: different tensors: only in A {sorted(set(a) - set(b))[:5]}, only in B {sorted(set(b) - set(a))[:5]}")
        ok = False
    worst, identical, checked = 0.0, True, 0
    for name in sorted(set(a) & set(b)):
        (da, sa, va), (db, sb, vb) = a[name], b[name]
        if (da, sa) != (db, sb):
            print(f"FAIL: {name}: {da}{list(sa)} against {db}{list(sb)}")
            ok = False
            continue
        checked += 1
        diff = max((abs(x - y) for x, y in zip(va, vb)), default=0.0)
        scale = max((abs(x) for x in va), default=0.0)
        if any(math.isnan(x) or math.isnan(y) for x, y in zip(va, vb)):
            print(f"FAIL: {name}: NaN")
            ok = False
            continue
        if diff != 0.0:
            identical = False
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        worst = max(worst, rel)
        if rel > args.rtol:
            print(f"FAIL: {name}: max |a-b| {diff:.3e} = {rel:.3e} of max |a| {scale:.3e} > rtol {args.rtol:g}")
            ok = False
    what = "bit-identical" if identical and ok else f"max |a-b| {worst:.2e} of max |a| (rtol {args.rtol:g})"
    print(f"headline: {checked} tensors, {what}")
    print("PASS" if ok and checked > 0 else "FAIL")
    return 0 if ok and checked > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
