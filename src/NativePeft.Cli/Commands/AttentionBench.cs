using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Ops.Reference;
using NativePeft.Runtime;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft bench --op attention`: causal GQA attention (GpuAttentionOps on device pointers, bf16; the C#
/// reference AttentionRef in fp32 on cpu) forward and backward at prefill shapes, in TFLOP/s by the FlashAttention
/// convention, and decoding (one query row against a KV cache) in GB/s of K+V read, next to a device copy measured in
/// the same run. tests/reference/attn_peer.py measures PyTorch's SDPA on the same shapes and writes the same JSON keys.
/// </summary>
internal static class AttentionBench
{
    public const string FlopConvention =
        "FLOP convention (FlashAttention): forward = 4·B·Hq·T²·D / 2 (causal halves it), backward = 2.5 × forward; " +
        "decode GB/s = K+V bytes read (B·T·Hkv·D·2 bytes × 2) / time";

    public sealed record Shape(int Batch, int Seq, int HeadsQ, int HeadsKv, int HeadDim);

    public sealed record PrefillRow(
        [property: JsonPropertyName("batch")] int Batch,
        [property: JsonPropertyName("seq")] int Seq,
        [property: JsonPropertyName("heads_q")] int HeadsQ,
        [property: JsonPropertyName("heads_kv")] int HeadsKv,
        [property: JsonPropertyName("head_dim")] int HeadDim,
        [property: JsonPropertyName("fwd_ms")] double FwdMs,
        [property: JsonPropertyName("bwd_ms")] double BwdMs,
        [property: JsonPropertyName("fwd_flops")] double FwdFlops,
        [property: JsonPropertyName("bwd_flops")] double BwdFlops,
        [property: JsonPropertyName("fwd_tflops")] double FwdTflops,
        [property: JsonPropertyName("bwd_tflops")] double BwdTflops);

    public sealed record DecodeRow(
        [property: JsonPropertyName("batch")] int Batch,
        [property: JsonPropertyName("kv_len")] int KvLen,
        [property: JsonPropertyName("heads_q")] int HeadsQ,
        [property: JsonPropertyName("heads_kv")] int HeadsKv,
        [property: JsonPropertyName("head_dim")] int HeadDim,
        [property: JsonPropertyName("ms")] double Ms,
        [property: JsonPropertyName("kv_bytes")] double KvBytes,
        [property: JsonPropertyName("gbps")] double GBps,
        [property: JsonPropertyName("copy_gbps")] double CopyGBps,
        [property: JsonPropertyName("of_copy")] double OfCopy);

    public sealed record Report(
        [property: JsonPropertyName("implementation")] string Implementation,
        [property: JsonPropertyName("device")] string Device,
        [property: JsonPropertyName("device_kind")] string DeviceKind,
        [property: JsonPropertyName("dtype")] string DType,
        [property: JsonPropertyName("causal")] bool Causal,
        [property: JsonPropertyName("timing")] string Timing,
        [property: JsonPropertyName("flop_convention")] string FlopConvention,
        [property: JsonPropertyName("copy_gbps")] double CopyGBps,
        [property: JsonPropertyName("prefill")] IReadOnlyList<PrefillRow> Prefill,
        [property: JsonPropertyName("decode")] IReadOnlyList<DecodeRow> Decode,
        [property: JsonPropertyName("notes")] IReadOnlyList<string> Notes);

    /// <summary>The shape overrides of the command line (null: the device's defaults).</summary>
    public sealed record Overrides(int[]? Seq, int[]? Batch, int? HeadsQ, int? HeadsKv, int? HeadDim);

    /// <summary>
    /// Checks the overrides: every value positive, Hq a multiple of Hkv, D at most <see cref="GpuAttentionOps.MaxHeadDim"/>.
    /// A bad value is a one-line <see cref="CliException"/> naming the option (exit code 2).
    /// </summary>
    public static void Validate(Overrides o)
    {
        foreach (var (name, values) in new[] { ("--seq", o.Seq), ("--batch", o.Batch) })
            foreach (int v in values ?? [])
                if (v <= 0) throw new CliException($"{name} {v}: must be a positive integer", 2);
        foreach (var (name, value) in new[] { ("--heads", o.HeadsQ), ("--kv-heads", o.HeadsKv), ("--head-dim", o.HeadDim) })
            if (value is <= 0) throw new CliException($"{name} {value}: must be a positive integer", 2);
        if (o.HeadDim is > GpuAttentionOps.MaxHeadDim)
            throw new CliException($"--head-dim {o.HeadDim}: at most {GpuAttentionOps.MaxHeadDim} (the kernels' largest head dimension)", 2);
        if (o.HeadsQ is int hq && o.HeadsKv is int hkv && hq % hkv != 0)
            throw new CliException($"--kv-heads {hkv}: must divide --heads {hq} (grouped-query attention)", 2);
    }

    /// <summary>The prefill and decode shapes for a device: the full-size list on CUDA, small ones elsewhere; overrides replace the defaults.</summary>
    public static (List<Shape> Prefill, List<Shape> Decode) Shapes(bool cuda, Overrides o)
    {
        int hq = o.HeadsQ ?? (cuda ? 32 : 4);
        int hkv = o.HeadsKv ?? (cuda ? 8 : 1);
        int d = o.HeadDim ?? 128;
        if (hq % hkv != 0)
            throw new CliException(o.HeadsKv is null
                ? $"--heads {hq}: must be a multiple of the default --kv-heads {hkv} (give --kv-heads too)"
                : $"--kv-heads {hkv}: must divide the default --heads {hq} (give --heads too)", 2);
        List<Shape> prefill, decode;
        if (o.Seq is null && o.Batch is null)
        {
            prefill = cuda
                ? [new(1, 1024, hq, hkv, d), new(1, 2048, hq, hkv, d), new(1, 4096, hq, hkv, d), new(1, 8192, hq, hkv, d), new(4, 4096, hq, hkv, d)]
                : [new(1, 128, hq, hkv, d)];
            decode = cuda ? [new(1, 4096, hq, hkv, d), new(8, 4096, hq, hkv, d)] : [new(1, 128, hq, hkv, d), new(2, 128, hq, hkv, d)];
        }
        else
        {
            int[] seqs = o.Seq ?? [cuda ? 4096 : 128];
            int[] batches = o.Batch ?? [1];
            prefill = [.. from b in batches from t in seqs select new Shape(b, t, hq, hkv, d)];
            decode = [.. prefill];
        }
        return (prefill, decode);
    }

    public static double ForwardFlops(Shape s) => 4.0 * s.Batch * s.HeadsQ * (double)s.Seq * s.Seq * s.HeadDim / 2;
    public static double BackwardFlops(Shape s) => 2.5 * ForwardFlops(s);

    /// <summary>K and V bytes one decode step reads: B·T·Hkv·D elements of 2 bytes (bf16), twice.</summary>
    public static double DecodeKvBytes(Shape s, int elementSize) => 2.0 * s.Batch * s.Seq * s.HeadsKv * s.HeadDim * elementSize;

    public static int Run(TextWriter stdout, string deviceName, Overrides overrides, bool jsonRequested, string? jsonFile)
    {
        Validate(overrides);
        Report report;
        bool? tensorCores = null;
        if (deviceName == "cpu")
        {
            var (prefill, decode) = Shapes(false, overrides);
            report = RunCpu(prefill, decode);
        }
        else
        {
            using var gpu = DeviceOption.Open(deviceName)!;
            bool cuda = gpu.Properties.Kind == GpuKind.Cuda;
            var (prefill, decode) = Shapes(cuda, overrides);
            var attention = new GpuAttentionOps(gpu);
            tensorCores = attention.UsesTensorCores(DType.BF16, prefill[0].HeadDim);
            report = RunGpu(gpu, attention, prefill, decode);
        }

        if (jsonFile is not null)
        {
            string? dir = Path.GetDirectoryName(Path.GetFullPath(jsonFile));
            if (dir is not null) Directory.CreateDirectory(dir);
            try { NativePeft.IO.OutputFolder.WriteAllTextAtomic(jsonFile, Serialize(report)); }
            catch (Exception e) when (NativePeft.IO.OutputFolder.IsWriteFailure(e)) { throw NativePeft.IO.OutputFolder.WriteFailed(jsonFile, e); }
        }
        if (jsonRequested && jsonFile is null)
        {
            stdout.WriteLine(Serialize(report));
            return 0;
        }
        Print(stdout, report, tensorCores);
        if (jsonFile is not null) stdout.WriteLine($"figures written to {jsonFile}");
        return 0;
    }

    private static string Serialize(Report report) => JsonSerializer.Serialize(report,
        new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping });

    private static void Print(TextWriter stdout, Report r, bool? tensorCores)
    {
        var console = Output.Console(stdout);
        string forwardPath = tensorCores switch
        {
            true => "forward, backward and decode on the tensor-core kernels (kernels/attention_tc*.cu, attention_decode.cu)",
            false => "forward, backward and decode on the fp32-arithmetic kernels (kernels/attention.cu)",
            null => "C# reference (AttentionRef), fp32",
        };
        stdout.WriteLine($"causal GQA attention, {r.DType}, on {r.Device}: {forwardPath}");
        var table = new Table().Border(TableBorder.Rounded)
            .Title("prefill: forward and backward")
            .AddColumn(new TableColumn("B").RightAligned()).AddColumn(new TableColumn("T").RightAligned())
            .AddColumn(new TableColumn("Hq/Hkv/D").RightAligned())
            .AddColumn(new TableColumn("fwd ms").RightAligned()).AddColumn(new TableColumn("fwd TFLOP/s").RightAligned())
            .AddColumn(new TableColumn("bwd ms").RightAligned()).AddColumn(new TableColumn("bwd TFLOP/s").RightAligned());
        foreach (var p in r.Prefill)
            table.AddRow(p.Batch.ToString(), p.Seq.ToString(), $"{p.HeadsQ}/{p.HeadsKv}/{p.HeadDim}",
                p.FwdMs.ToString("0.000"), Tflops(p.FwdTflops), p.BwdMs.ToString("0.000"), Tflops(p.BwdTflops));
        console.Write(table);
        var dec = new Table().Border(TableBorder.Rounded)
            .Title(Markup.Escape($"decode: one query row against a KV cache; copy {Rate(r.CopyGBps)} GB/s"))
            .AddColumn(new TableColumn("B").RightAligned()).AddColumn(new TableColumn("KV T").RightAligned())
            .AddColumn(new TableColumn("Hq/Hkv/D").RightAligned()).AddColumn(new TableColumn("ms").RightAligned())
            .AddColumn(new TableColumn("K+V MiB").RightAligned()).AddColumn(new TableColumn("GB/s").RightAligned())
            .AddColumn(new TableColumn("of copy GB/s").RightAligned());
        foreach (var d in r.Decode)
            dec.AddRow(d.Batch.ToString(), d.KvLen.ToString(), $"{d.HeadsQ}/{d.HeadsKv}/{d.HeadDim}", d.Ms.ToString("0.0000"),
                (d.KvBytes / (1 << 20)).ToString("0.00"), Rate(d.GBps), d.OfCopy >= 0.01 ? d.OfCopy.ToString("P0") : d.OfCopy.ToString("P3"));
        console.Write(dec);
        stdout.WriteLine($"decode: ForwardCached with queryLen 1 (lse not written) and a split-KV workspace; copy = a device-to-device copy in this run, read + write bytes counted");
        stdout.WriteLine(FlopConvention);
        stdout.WriteLine("timing: " + r.Timing);
        foreach (var n in r.Notes) stdout.WriteLine("note: " + n);
    }

    private static string Tflops(double v) => v >= 1 ? v.ToString("0.0") : v.ToString("0.000000");
    private static string Rate(double v) => v >= 10 ? v.ToString("0.0") : v.ToString("0.000");

    // ------------------------------------------------------------------------------------------
    // Timing
    // ------------------------------------------------------------------------------------------

    /// <summary>
    /// Median milliseconds per call: two warm-up calls, then timed loops of <c>inner</c> calls (about 5 ms of work each,
    /// 1..100 calls) between two synchronizations of the device; at least <paramref name="minLoops"/> loops, more while
    /// under <paramref name="budgetSeconds"/> (at most 50).
    /// </summary>
    private static double Time(Action op, Action sync, int minLoops, double budgetSeconds)
    {
        op(); sync();
        var warm = Stopwatch.StartNew();
        op(); sync();
        double once = Math.Max(warm.Elapsed.TotalMilliseconds, 1e-3);
        int inner = Math.Clamp((int)Math.Ceiling(5.0 / once), 1, 100);
        var samples = new List<double>();
        var total = Stopwatch.StartNew();
        while (samples.Count < minLoops || (total.Elapsed.TotalSeconds < budgetSeconds && samples.Count < 50))
        {
            sync();
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < inner; i++) op();
            sync();
            samples.Add(sw.Elapsed.TotalMilliseconds / inner);
        }
        samples.Sort();
        return samples[samples.Count / 2];
    }

    private static string TimingText(int minLoops, double budget) =>
        $"median over ≥ {minLoops} timed loops (about {budget:0.0} s per figure) after 2 warm-up calls; each loop runs a call " +
        "repeatedly (about 5 ms of work) between two synchronizations of the device and counts its time per call";

    // ------------------------------------------------------------------------------------------
    // Device (CUDA or the emulator)
    // ------------------------------------------------------------------------------------------

    private static Report RunGpu(IGpu gpu, GpuAttentionOps attention, List<Shape> prefillShapes, List<Shape> decodeShapes)
    {
        bool cuda = gpu.Properties.Kind == GpuKind.Cuda;
        int minLoops = cuda ? 5 : 3;
        double budget = cuda ? 0.5 : 0.1;
        const DType dt = DType.BF16;
        var ptrs = new List<DevicePtr>();
        DevicePtr Alloc(long bytes) { var p = gpu.Alloc(Math.Max(bytes, 16)); ptrs.Add(p); return p; }
        void FreeAll() { foreach (var p in ptrs) gpu.Free(p); ptrs.Clear(); }
        var notes = new List<string>();
        try
        {
            // The memory ceiling of this run: a device-to-device copy (read + write counted), as `bench` measures it.
            long copyElements = cuda ? 64L << 20 : 4L << 20;
            var src = Alloc(copyElements * 2); var dst = Alloc(copyElements * 2);
            gpu.CopyToDevice<BFloat16>(RandomBf16(copyElements, 1), src);
            double copyMs = Time(() => gpu.CopyDeviceToDevice(src, dst, copyElements * 2), gpu.Synchronize, minLoops, budget);
            double copyGBps = 2.0 * copyElements * 2 / (copyMs * 1e-3) / 1e9;
            FreeAll();

            var prefill = new List<PrefillRow>();
            foreach (var s in prefillShapes)
            {
                long qn = (long)s.Batch * s.Seq * s.HeadsQ * s.HeadDim, kvn = (long)s.Batch * s.Seq * s.HeadsKv * s.HeadDim;
                var q = Alloc(qn * 2); var k = Alloc(kvn * 2); var v = Alloc(kvn * 2); var o = Alloc(qn * 2);
                var dout = Alloc(qn * 2); var dq = Alloc(qn * 2); var dk = Alloc(kvn * 2); var dv = Alloc(kvn * 2);
                var lse = Alloc((long)s.Batch * s.HeadsQ * s.Seq * 4);
                var work = Alloc(GpuAttentionOps.BackwardWorkspaceBytes(s.Batch, s.Seq, s.HeadsQ));
                gpu.CopyToDevice<BFloat16>(RandomBf16(qn, 2), q);
                gpu.CopyToDevice<BFloat16>(RandomBf16(kvn, 3), k);
                gpu.CopyToDevice<BFloat16>(RandomBf16(kvn, 4), v);
                gpu.CopyToDevice<BFloat16>(RandomBf16(qn, 5), dout);
                double fwd = Time(() => attention.Forward(dt, q, k, v, o, lse, s.Batch, s.Seq, s.HeadsQ, s.HeadsKv, s.HeadDim),
                    gpu.Synchronize, minLoops, budget);
                double bwd = Time(() => attention.Backward(dt, dout, q, k, v, o, lse, dq, dk, dv, work, s.Batch, s.Seq, s.HeadsQ, s.HeadsKv, s.HeadDim),
                    gpu.Synchronize, minLoops, budget);
                FreeAll();
                prefill.Add(Prefill(s, fwd, bwd));
            }

            var decode = new List<DecodeRow>();
            foreach (var s in decodeShapes)
            {
                long qn = (long)s.Batch * s.HeadsQ * s.HeadDim, kvn = (long)s.Batch * s.Seq * s.HeadsKv * s.HeadDim;
                // On CUDA, caches are rotated over at least 256 MiB so that the timed reads come from device memory, not
                // from a warm L2 (a single 16 MiB cache would fit in an H100's or H200's 50 MB L2).
                int copies = cuda ? (int)Math.Clamp((256L << 20) / (kvn * 4) + 1, 1, 64) : 1;
                var q = Alloc(qn * 2); var o = Alloc(qn * 2);
                gpu.CopyToDevice<BFloat16>(RandomBf16(qn, 6), q);
                var ks = new DevicePtr[copies]; var vs = new DevicePtr[copies];
                var hostK = RandomBf16(kvn, 7); var hostV = RandomBf16(kvn, 8);
                for (int c = 0; c < copies; c++)
                {
                    ks[c] = Alloc(kvn * 2); vs[c] = Alloc(kvn * 2);
                    gpu.CopyToDevice<BFloat16>(hostK, ks[c]); gpu.CopyToDevice<BFloat16>(hostV, vs[c]);
                }
                // A workspace for the split-KV decode (what generate lends it: the MLP's gate buffer), room for 64 splits;
                // ForwardCached picks the splits (two CTAs per multiprocessor) when the shape allows it.
                long wsBytes = 64 * GpuAttentionOps.DecodeWorkspaceBytesPerSplit(s.Batch, s.HeadsKv, s.HeadDim);
                var ws = Alloc(wsBytes);
                int splits = attention.UsesTensorCores(dt, s.HeadDim, q, ks[0], vs[0], o)
                    ? attention.DecodeSplits(s.Batch, 1, s.Seq, s.HeadsQ, s.HeadsKv, s.HeadDim, ws, wsBytes) : 0;
                notes.Add($"decode B={s.Batch} T={s.Seq}: " + (splits >= 1 ? $"split-KV decode kernel, {splits} split(s)" : "the forward kernel (no decode kernel for this shape)"));
                int next = 0;
                double ms = Time(() =>
                {
                    attention.ForwardCached(dt, q, ks[next], vs[next], o, DevicePtr.Null, s.Batch, 1, s.Seq, s.HeadsQ, s.HeadsKv, s.HeadDim,
                        ws, wsBytes);
                    next = (next + 1) % copies;
                }, gpu.Synchronize, minLoops, budget);
                FreeAll();
                decode.Add(Decode(s, ms, 2, copyGBps));
            }
            if (cuda)
                notes.Add("decode: each timed call reads a different copy of the KV cache (≥ 256 MiB in all), so the figure is device memory, not L2");
            else
                notes.Add("emulator timings measure the CPU emulator running the kernels; they mean nothing for GPU speed " +
                          "(run `bench --op attention --device cuda` on a GPU, or ./gpu-check)");
            return new Report("nativepeft", gpu.Properties.Name, cuda ? "cuda" : "emulator", "bf16", true,
                TimingText(minLoops, budget), FlopConvention, copyGBps, prefill, decode, notes);
        }
        finally
        {
            FreeAll();
        }
    }

    // ------------------------------------------------------------------------------------------
    // CPU reference (fp32)
    // ------------------------------------------------------------------------------------------

    private static Report RunCpu(List<Shape> prefillShapes, List<Shape> decodeShapes)
    {
        const int minLoops = 3;
        const double budget = 0.1;
        static void None() { }
        long copyElements = 4L << 20;
        var csrc = RandomF32(copyElements, 1); var cdst = new float[copyElements];
        double copyMs = Time(() => csrc.AsSpan().CopyTo(cdst), None, minLoops, budget);
        double copyGBps = 2.0 * copyElements * 4 / (copyMs * 1e-3) / 1e9;

        var prefill = new List<PrefillRow>();
        foreach (var s in prefillShapes)
        {
            long qn = (long)s.Batch * s.Seq * s.HeadsQ * s.HeadDim, kvn = (long)s.Batch * s.Seq * s.HeadsKv * s.HeadDim;
            if (qn > int.MaxValue / 2) throw new CliException($"--seq {s.Seq}: too large for the CPU reference at this batch and head count", 2);
            float[] q = RandomF32(qn, 2), k = RandomF32(kvn, 3), v = RandomF32(kvn, 4), dout = RandomF32(qn, 5);
            float[] o = new float[qn], dq = new float[qn], dk = new float[kvn], dv = new float[kvn];
            float[] lse = new float[(long)s.Batch * s.HeadsQ * s.Seq];
            double fwd = Time(() => AttentionRef.Forward<float>(q, k, v, o, lse, s.Batch, s.Seq, s.HeadsQ, s.HeadsKv, s.HeadDim), None, minLoops, budget);
            double bwd = Time(() => AttentionRef.Backward<float>(dout, q, k, v, o, lse, dq, dk, dv, s.Batch, s.Seq, s.HeadsQ, s.HeadsKv, s.HeadDim),
                None, minLoops, budget);
            prefill.Add(Prefill(s, fwd, bwd));
        }
        var decode = new List<DecodeRow>();
        foreach (var s in decodeShapes)
        {
            long qn = (long)s.Batch * s.HeadsQ * s.HeadDim, kvn = (long)s.Batch * s.Seq * s.HeadsKv * s.HeadDim;
            float[] q = RandomF32(qn, 6), k = RandomF32(kvn, 7), v = RandomF32(kvn, 8), o = new float[qn];
            double ms = Time(() => AttentionRef.ForwardCached<float>(q, k, v, o, [], s.Batch, 1, s.Seq, s.HeadsQ, s.HeadsKv, s.HeadDim),
                None, minLoops, budget);
            decode.Add(Decode(s, ms, 4, copyGBps));
        }
        return new Report("nativepeft", $"CPU reference ({Environment.ProcessorCount} cores)", "cpu", "fp32", true,
            TimingText(minLoops, budget), FlopConvention, copyGBps, prefill, decode,
            ["the CPU reference computes in fp32 (4-byte K and V in the decode GB/s); its timings say nothing about GPU speed"]);
    }

    private static PrefillRow Prefill(Shape s, double fwdMs, double bwdMs)
    {
        double ff = ForwardFlops(s), bf = BackwardFlops(s);
        return new PrefillRow(s.Batch, s.Seq, s.HeadsQ, s.HeadsKv, s.HeadDim, fwdMs, bwdMs, ff, bf,
            ff / (fwdMs * 1e-3) / 1e12, bf / (bwdMs * 1e-3) / 1e12);
    }

    private static DecodeRow Decode(Shape s, double ms, int elementSize, double copyGBps)
    {
        double bytes = DecodeKvBytes(s, elementSize), gbps = bytes / (ms * 1e-3) / 1e9;
        return new DecodeRow(s.Batch, s.Seq, s.HeadsQ, s.HeadsKv, s.HeadDim, ms, bytes, gbps, copyGBps, gbps / copyGBps);
    }

    private static BFloat16[] RandomBf16(long n, int seed)
    {
        var rng = new Random(seed);
        var v = new BFloat16[n];
        for (long i = 0; i < n; i++) v[i] = (BFloat16)(float)(rng.NextDouble() * 2 - 1);
        return v;
    }

    private static float[] RandomF32(long n, int seed)
    {
        var rng = new Random(seed);
        var v = new float[n];
        for (long i = 0; i < n; i++) v[i] = (float)(rng.NextDouble() * 2 - 1);
        return v;
    }
}
