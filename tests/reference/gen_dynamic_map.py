#!/usr/bin/env python3
"""Oracle for NativePeft's dynamic 8-bit maps.

Reproduces bitsandbytes' create_dynamic_map (bitsandbytes/functional.py) with torch and writes the
256 fp32 values as raw little-endian float32 files:
  tests/NativePeft.Tests/Data/dynamic_map_signed.f32    create_dynamic_map(signed=True)
  tests/NativePeft.Tests/Data/dynamic_map_unsigned.f32  create_dynamic_map(signed=False)
Run with Debian's python3-torch:  /usr/bin/python3 tests/reference/gen_dynamic_map.py
"""
import os
import struct
import sys

import torch


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    data = []
    non_sign_bits = total_bits - 1  # bitsandbytes writes (1 if signed else 1)
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items)  # float32
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2 ** total_bits
    gap = 256 - len(data)
    for _ in range(gap):
        data.append(0)
    data.sort()
    return torch.Tensor(data)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "NativePeft.Tests", "Data")
    for signed, name in ((True, "dynamic_map_signed.f32"), (False, "dynamic_map_unsigned.f32")):
        values = create_dynamic_map(signed=signed)
        assert values.dtype == torch.float32 and values.numel() == 256
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(struct.pack("<256f", *values.tolist()))
        print(name, "torch", torch.__version__, "min", values.min().item(), "max", values.max().item())


if __name__ == "__main__":
    main()
