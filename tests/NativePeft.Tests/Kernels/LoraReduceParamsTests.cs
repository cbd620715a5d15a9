using NativePeft.Ops;
using NativePeft.Runtime;
using NUnit.Framework;

namespace NativePeft.Tests.Kernels;

/// <summary>
/// lora_down_reduce_bf16 and lora_da_reduce_f32 launched with a <see cref="LoraReduceParams"/> on the emulator (the LoRA
/// kernel tests need CUDA): every field reaches the kernel where the C struct has it. The partials are small integers
/// whose sums are exact in bf16 and fp32 and depend on the split, the row and the padded column, so a swapped or shifted
/// field (n vs R, in vs R, a rank, a destination) gives other values; the expected values are computed here from the
/// formula of kernels/lora.cu (xa_g[row][j] = Σ_s ws[s][row][16·goff_g + j]; dA_g[j][c] += Σ_s ws[s][16·goff_g + j][c]).
/// </summary>
public sealed class LoraReduceParamsTests
{
    private const int Splits = 3, Rank0 = 3, Rank1 = 17, Padded = 16 + 32;
    private const ushort Sentinel = 0x7FC1;

    private static float Partial(int split, int a, int b) => split switch { 0 => a, 1 => b, _ => 1 };

    private static ushort Bf16(float v) => (ushort)(BitConverter.SingleToInt32Bits(v) >> 16);

    [Test]
    public void DownReduceWritesTheSplitSumsIntoEachAdaptersXa()
    {
        const int rows = 2;
        using var gpu = EmulatedGpu.Create();
        var ws = new float[Splits * rows * Padded];
        for (int s = 0; s < Splits; s++)
            for (int r = 0; r < rows; r++)
                for (int p = 0; p < Padded; p++)
                    ws[(s * rows + r) * Padded + p] = Partial(s, p, r);
        DevicePtr dWs = gpu.Alloc(ws.Length * sizeof(float)), xa0 = gpu.Alloc(rows * Rank0 * 2 + 2), xa1 = gpu.Alloc(rows * Rank1 * 2 + 2);
        gpu.CopyToDevice<float>(ws, dWs);
        gpu.CopyToDevice<ushort>(Enumerable.Repeat(Sentinel, rows * Rank0 + 1).ToArray(), xa0);
        gpu.CopyToDevice<ushort>(Enumerable.Repeat(Sentinel, rows * Rank1 + 1).ToArray(), xa1);
        gpu.LaunchWithParams("lora_down_reduce_bf16", 2, 64, 0, new LoraReduceParams
        {
            Ws = dWs, Dst0 = xa0, Dst1 = xa1, Splits = Splits, N = rows, R = Padded, Count = 2, R0 = Rank0, R1 = Rank1,
        });
        var got0 = new ushort[rows * Rank0 + 1];
        var got1 = new ushort[rows * Rank1 + 1];
        gpu.CopyToHost<ushort>(xa0, got0);
        gpu.CopyToHost<ushort>(xa1, got1);
        var want0 = new ushort[got0.Length];
        var want1 = new ushort[got1.Length];
        for (int r = 0; r < rows; r++)
        {
            for (int j = 0; j < Rank0; j++) want0[r * Rank0 + j] = Bf16(j + r + 1);
            for (int j = 0; j < Rank1; j++) want1[r * Rank1 + j] = Bf16(16 + j + r + 1);
        }
        want0[^1] = Sentinel;
        want1[^1] = Sentinel;
        Assert.Multiple(() =>
        {
            Assert.That(got0, Is.EqualTo(want0), "xa_0 (and nothing past it)");
            Assert.That(got1, Is.EqualTo(want1), "xa_1 (and nothing past it)");
        });
    }

    [Test]
    public void DaReduceAddsTheSplitSumsToEachAdaptersDa()
    {
        const int inFeatures = 5;
        using var gpu = EmulatedGpu.Create();
        var ws = new float[Splits * Padded * inFeatures];
        for (int s = 0; s < Splits; s++)
            for (int p = 0; p < Padded; p++)
                for (int c = 0; c < inFeatures; c++)
                    ws[(s * Padded + p) * inFeatures + c] = Partial(s, p, c);
        DevicePtr dWs = gpu.Alloc(ws.Length * sizeof(float));
        DevicePtr da0 = gpu.Alloc((Rank0 * inFeatures + 1) * sizeof(float)), da1 = gpu.Alloc((Rank1 * inFeatures + 1) * sizeof(float));
        gpu.CopyToDevice<float>(ws, dWs);
        gpu.CopyToDevice<float>(Enumerable.Repeat(0.5f, Rank0 * inFeatures + 1).ToArray(), da0);
        gpu.CopyToDevice<float>(Enumerable.Repeat(0.5f, Rank1 * inFeatures + 1).ToArray(), da1);
        gpu.LaunchWithParams("lora_da_reduce_f32", 3, 64, 0, new LoraReduceParams
        {
            Ws = dWs, Dst0 = da0, Dst1 = da1, Splits = Splits, R = Padded, In = inFeatures, Count = 2, R0 = Rank0, R1 = Rank1,
        });
        var got0 = new float[Rank0 * inFeatures + 1];
        var got1 = new float[Rank1 * inFeatures + 1];
        gpu.CopyToHost<float>(da0, got0);
        gpu.CopyToHost<float>(da1, got1);
        var want0 = Enumerable.Repeat(0.5f, got0.Length).ToArray();
        var want1 = Enumerable.Repeat(0.5f, got1.Length).ToArray();
        for (int c = 0; c < inFeatures; c++)
        {
            for (int j = 0; j < Rank0; j++) want0[j * inFeatures + c] += j + c + 1;
            for (int j = 0; j < Rank1; j++) want1[j * inFeatures + c] += 16 + j + c + 1;
        }
        Assert.Multiple(() =>
        {
            Assert.That(got0, Is.EqualTo(want0), "dA_0 (and nothing past it)");
            Assert.That(got1, Is.EqualTo(want1), "dA_1 (and nothing past it)");
        });
    }
}
