#!/usr/bin/env python3
"""Torch oracles for NativePeft's CPU reference ops (src/NativePeft/Ops/Reference): RMSNorm, RoPE, LoRA.

Writes tests/NativePeft.Tests/Data/ops_rmsnorm.bin, ops_rope.bin, ops_lora.bin. Each input is stored as float32
(what the float path sees); each output twice: the HF/PEFT float32 pipeline ("*_f32") and the same formula in
float64 on the same (float32-valued) inputs ("*_f64"), plus float64 autograd gradients for a given upstream
gradient. Run with Debian's python3-torch (1.13):  /usr/bin/python3 tests/reference/gen_ops_reference.py

File format (little-endian), read by tests/NativePeft.Tests/Reference/GradCheck.cs (OpsOracle):
  b"NPOR", u32 count, then count records of
  u16 name length, name (UTF-8), u8 dtype (0 f32, 1 f64, 2 i32, 3 u8), u8 ndim, u32 dims[ndim], raw data.
"""
import math
import os
import struct
import sys

import torch

DTYPES = {torch.float32: 0, torch.float64: 1, torch.int32: 2, torch.uint8: 3}


def write(path, tensors):
    with open(path, "wb") as f:
        f.write(b"NPOR")
        f.write(struct.pack("<I", len(tensors)))
        for name, t in tensors.items():
            t = t.detach().contiguous().cpu()
            encoded = name.encode()
            f.write(struct.pack("<H", len(encoded)))
            f.write(encoded)
            f.write(struct.pack("<BB", DTYPES[t.dtype], t.dim()))
            f.write(struct.pack("<%dI" % t.dim(), *t.shape))
            f.write(t.numpy().tobytes())
    print(os.path.basename(path), {k: tuple(v.shape) for k, v in tensors.items()})


def rmsnorm(out_dir, g):
    # HF LlamaRMSNorm, fp32 input: variance in fp32, x * rsqrt(var + eps), then weight * (cast back: no-op).
    rows, cols, eps = 5, 24, 1e-5
    x = torch.randn(rows, cols, generator=g) * 2
    w = 1 + 0.1 * torch.randn(cols, generator=g)
    dy = torch.randn(rows, cols, generator=g)

    def hf(x, w):
        variance = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(variance + eps))

    y32 = hf(x, w)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    y64 = hf(x64, w64)
    y64.backward(dy.double())
    write(os.path.join(out_dir, "ops_rmsnorm.bin"), {
        "x": x, "w": w, "dy": dy, "eps": torch.tensor([eps], dtype=torch.float64),
        "y_f32": y32, "y_f64": y64, "dx_f64": x64.grad, "dw_f64": w64.grad})


def llama3_inv_freq(inv_freq, factor, low, high, old):
    # transformers.modeling_rope_utils._compute_llama3_parameters
    low_freq_wavelen = old / low
    high_freq_wavelen = old / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope(out_dir, g):
    # HF LlamaRotaryEmbedding + apply_rotary_pos_emb, q in HF layout [B, H, T, D]; ours is [B, T, H, D].
    batch, seq, heads, dim, theta = 2, 5, 3, 16, 500000.0
    factor, low, high, old = 8.0, 1.0, 4.0, 8192
    x = torch.randn(batch, seq, heads, dim, generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 100, 1000, 3000, 8191]], dtype=torch.int32)

    def pipeline(dtype):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim))
        inv_freq = llama3_inv_freq(inv_freq, factor, low, high, old)
        freqs = (inv_freq[None, :, None] @ positions[:, None, :].to(dtype)).transpose(1, 2)  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # unsqueeze over heads: [B, 1, T, D]
        q = x.to(dtype).transpose(1, 2)  # [B, H, T, D]
        y = q * cos + rotate_half(q) * sin
        return inv_freq, y.transpose(1, 2).contiguous()

    inv32, y32 = pipeline(torch.float32)
    inv64, y64 = pipeline(torch.float64)
    write(os.path.join(out_dir, "ops_rope.bin"), {
        "x": x, "positions": positions,
        "config": torch.tensor([theta, factor, low, high, old], dtype=torch.float64),
        "inv_freq_f32": inv32, "inv_freq_f64": inv64, "y_f32": y32, "y_f64": y64})


def lora(out_dir, g):
    # PEFT lora.Linear forward: base(x) + lora_B(lora_A(dropout(x))) * scaling, dropout as an explicit mask.
    rows, fin, fout, rank, alpha, p = 6, 20, 12, 4, 8.0, 0.25
    scaling = alpha / rank
    x = torch.randn(rows, fin, generator=g)
    w = torch.randn(fout, fin, generator=g) / math.sqrt(fin)
    a = (torch.rand(rank, fin, generator=g) * 2 - 1) / math.sqrt(fin)
    b = torch.randn(fout, rank, generator=g) * 0.1  # nonzero, as after some training
    mask = (torch.rand(rows, fin, generator=g) >= p).to(torch.uint8)
    dy = torch.randn(rows, fout, generator=g)

    def forward(x, w, a, b):
        dropped = x * mask.to(x.dtype) / (1 - p)
        return x @ w.t() + (dropped @ a.t()) @ b.t() * scaling

    y32 = forward(x, w, a, b)
    x64, a64, b64 = (t.double().requires_grad_() for t in (x, a, b))
    y64 = forward(x64, w.double(), a64, b64)
    y64.backward(dy.double())
    write(os.path.join(out_dir, "ops_lora.bin"), {
        "x": x, "w": w, "a": a, "b": b, "mask": mask, "dy": dy,
        "config": torch.tensor([rank, alpha, p, scaling], dtype=torch.float64),
        "y_f32": y32, "y_f64": y64, "dx_f64": x64.grad, "da_f64": a64.grad, "db_f64": b64.grad})


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "NativePeft.Tests", "Data")
    print("torch", torch.__version__)
    g = torch.Generator().manual_seed(20240603)
    rmsnorm(out_dir, g)
    rope(out_dir, g)
    lora(out_dir, g)


if __name__ == "__main__":
    main()
