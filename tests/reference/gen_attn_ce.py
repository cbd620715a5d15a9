#!/usr/bin/python3
"""Torch oracle for AttentionRef and CrossEntropyRef (tests/NativePeft.Tests/Reference/*Tests.cs).

Writes tests/NativePeft.Tests/Data/attn_ce_attention.bin and attn_ce_crossentropy.bin: small fixed inputs
(float32, from torch.manual_seed) and torch's forward + autograd backward, computed in float32 (suffix none)
and again in float64 from the same float32-valued inputs (suffix _f64).

File format: a sequence of records, little-endian, until end of file:
  int32 name_len, name (ASCII), int32 dtype (0 = float32, 1 = float64, 2 = int32), int32 ndim, int32 dims[ndim], data.

Run: /usr/bin/python3 tests/reference/gen_attn_ce.py   (torch 1.13)
"""
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "NativePeft.Tests", "Data")
DTYPES = {np.float32: 0, np.float64: 1, np.int32: 2}


def write(path, tensors):
    with open(path, "wb") as f:
        for name, t in tensors:
            a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            if a.dtype == np.int64:
                a = a.astype(np.int32)
            a = np.ascontiguousarray(a)
            code = DTYPES[a.dtype.type]
            nb = name.encode("ascii")
            f.write(struct.pack("<i", len(nb)) + nb + struct.pack("<ii", code, a.ndim))
            f.write(struct.pack("<%di" % a.ndim, *a.shape))
            f.write(a.astype(a.dtype.newbyteorder("<")).tobytes())
    print(os.path.normpath(path), os.path.getsize(path), "bytes")


def attention(q, k, v):
    """q [B,T,Hq,D], k/v [B,T,Hkv,D] -> out [B,T,Hq,D], lse [B,Hq,T]; HF repeat_kv order (head h uses kv h // group)."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    qh = q.transpose(1, 2)                                   # [B,Hq,T,D]
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)   # [B,Hq,T,D]
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = qh @ kh.transpose(-1, -2) / (D ** 0.5)          # [B,Hq,T,T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                    # [B,Hq,T]
    out = (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2).contiguous()
    return out, lse


def attention_case():
    torch.manual_seed(1234)
    B, T, Hq, Hkv, D = 2, 5, 4, 2, 8
    q = torch.randn(B, T, Hq, D)
    k = torch.randn(B, T, Hkv, D)
    v = torch.randn(B, T, Hkv, D)
    dout = torch.randn(B, T, Hq, D)
    records = [("shape", torch.tensor([B, T, Hq, Hkv, D], dtype=torch.int32)),
               ("q", q), ("k", k), ("v", v), ("dout", dout)]
    for dtype, suffix in ((torch.float32, ""), (torch.float64, "_f64")):
        qq, kk, vv = (x.detach().to(dtype).clone().requires_grad_(True) for x in (q, k, v))
        out, lse = attention(qq, kk, vv)
        out.backward(dout.to(dtype))
        records += [("out" + suffix, out), ("lse" + suffix, lse),
                    ("dq" + suffix, qq.grad), ("dk" + suffix, kk.grad), ("dv" + suffix, vv.grad)]
    write(os.path.join(OUT, "attn_ce_attention.bin"), records)


def cross_entropy_case():
    torch.manual_seed(5678)
    N, C, V = 6, 8, 11
    hidden = torch.randn(N, C)
    weight = torch.randn(V, C) * 0.5
    labels = torch.tensor([3, -100, 0, 10, -100, 7], dtype=torch.int64)
    records = [("shape", torch.tensor([N, C, V], dtype=torch.int32)),
               ("hidden", hidden), ("weight", weight), ("labels", labels.to(torch.int32))]
    for dtype, suffix in ((torch.float32, ""), (torch.float64, "_f64")):
        h = hidden.detach().to(dtype).clone().requires_grad_(True)
        w = weight.detach().to(dtype).clone().requires_grad_(True)
        loss = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="mean")
        loss.backward()
        records += [("loss" + suffix, loss.reshape(1)), ("dhidden" + suffix, h.grad), ("dweight" + suffix, w.grad)]
    write(os.path.join(OUT, "attn_ce_crossentropy.bin"), records)


if __name__ == "__main__":
    attention_case()
    cross_entropy_case()
