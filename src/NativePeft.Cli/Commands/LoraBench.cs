using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Runtime;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft bench --op lora`: the fused LoRA kernels (kernels/lora.cu through <see cref="GpuOps.LoraDown"/> and
/// <see cref="GpuOps.LoraBackwardInput"/>) against the op sequence they replace (per adapter: Dropout, then the cuBLAS
/// GEMMs, DropoutBackward and Add, as LoraLinear runs them), bf16, on the q/k/v shape: three adapters of rank 16 sharing
/// x [N, in] (CUDA: N = 4096, in = 4096; the emulator: a small shape whose timings mean nothing for GPU speed), with
/// lora_dropout 0 and 0.1.
/// </summary>
internal static class LoraBench
{
    public sealed record Row(
        [property: JsonPropertyName("pass")] string Pass,
        [property: JsonPropertyName("dropout")] double Dropout,
        [property: JsonPropertyName("fused_ms")] double FusedMs,
        [property: JsonPropertyName("unfused_ms")] double UnfusedMs,
        [property: JsonPropertyName("speedup")] double Speedup);

    public sealed record Report(
        [property: JsonPropertyName("device")] string Device,
        [property: JsonPropertyName("device_kind")] string DeviceKind,
        [property: JsonPropertyName("tokens")] int Tokens,
        [property: JsonPropertyName("in_features")] int InFeatures,
        [property: JsonPropertyName("ranks")] int[] Ranks,
        [property: JsonPropertyName("rows")] IReadOnlyList<Row> Rows,
        [property: JsonPropertyName("notes")] IReadOnlyList<string> Notes);

    public static int Run(TextWriter stdout, string deviceName, bool jsonRequested)
    {
        if (deviceName == "cpu")
            throw new CliException("--op lora: the fused kernels need a device (--device cuda or emulator)", 2);
        using var gpu = DeviceOption.Open(deviceName)!;
        bool cuda = gpu.Properties.Kind == GpuKind.Cuda;
        int n = cuda ? 4096 : 128, inF = cuda ? 4096 : 256;
        int[] ranks = [16, 16, 16];
        var rows = new List<Row>();
        using (var ops = new GpuOps(gpu))
        {
            var t = new List<Tensor>();
            Tensor New(DType d, params int[] shape) { var x = ops.Memory.Allocate(d, shape); t.Add(x); return x; }
            try
            {
                var x = New(DType.BF16, n, inF);
                var dx = New(DType.BF16, n, inF);
                ops.Fill(x, 0.5);
                ops.Fill(dx, 0);
                var a = ranks.Select(r => New(DType.BF16, r, inF)).ToArray();
                var xa = ranks.Select(r => New(DType.BF16, n, r)).ToArray();
                var dxa = ranks.Select(r => New(DType.BF16, n, r)).ToArray();
                var da = ranks.Select(r => New(DType.F32, r, inF)).ToArray();
                foreach (var z in a.Concat(dxa)) ops.Fill(z, 0.01);
                foreach (var z in da) ops.Fill(z, 0);
                var dropped = New(DType.BF16, n, inF);
                var mask = New(DType.U8, n, inF);
                var din = New(DType.BF16, n, inF);
                void Sync() => gpu.Synchronize();
                foreach (double p in new[] { 0.0, 0.1 })
                {
                    var down = Enumerable.Range(0, ranks.Length).Select(g => new LoraDownArgs(a[g], p, (ulong)g + 1, xa[g])).ToList();
                    var back = Enumerable.Range(0, ranks.Length).Select(g => new LoraBackwardArgs(a[g], dxa[g], p, (ulong)g + 1, da[g])).ToList();
                    Tensor Drop(int g)
                    {
                        if (p == 0) return x;
                        ops.Dropout(x, mask, p, (ulong)g + 1, dropped);
                        return dropped;
                    }
                    double fFwd = Time(() => ops.LoraDown(x, down), Sync);
                    double uFwd = Time(() =>
                    {
                        for (int g = 0; g < ranks.Length; g++) ops.Matmul(Drop(g), false, a[g], true, xa[g]);
                    }, Sync);
                    double fBwd = Time(() => ops.LoraBackwardInput(x, back, dx), Sync);
                    double uBwd = Time(() =>
                    {
                        for (int g = 0; g < ranks.Length; g++)
                        {
                            var d = Drop(g);
                            ops.Matmul(dxa[g], true, d, false, da[g], 1, 1);
                            ops.Matmul(dxa[g], false, a[g], false, din);
                            if (p > 0) ops.DropoutBackward(din, mask, p, din);
                            ops.Add(dx, din, dx);
                        }
                    }, Sync);
                    rows.Add(new Row("forward: xa = dropout(x)·Aᵀ", p, fFwd, uFwd, uFwd / fFwd));
                    rows.Add(new Row("backward: dx += …, dA += …", p, fBwd, uBwd, uBwd / fBwd));
                }
            }
            finally
            {
                gpu.Synchronize();
                foreach (var z in t) ops.Memory.Free(z);
            }
        }
        var notes = new List<string>
        {
            "unfused = per adapter: Dropout (mask + dropout(x)) when p > 0, then the GEMMs (cuBLAS on CUDA), DropoutBackward and Add, as LoraLinear runs them; the xa·Bᵀ and dy·B GEMMs, unchanged by the fusion, are in neither",
            "fused forward includes the workspace reduce; fused backward the dA reduce; both include their workspace allocation from the ops' memory",
        };
        if (!cuda) notes.Add("emulator: the kernels run on the CPU; these timings mean nothing for GPU speed");
        var report = new Report(gpu.Properties.Name, cuda ? "cuda" : "emulator", n, inF, ranks, rows, notes);
        if (jsonRequested)
        {
            stdout.WriteLine(JsonSerializer.Serialize(report, new JsonSerializerOptions
            {
                WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
            }));
            return 0;
        }
        var console = Output.Console(stdout);
        var table = new Table().Border(TableBorder.Rounded)
            .Title(Markup.Escape($"LoRA q/k/v: 3 adapters of rank {ranks[0]} sharing x [{n}, {inF}], bf16, on {report.Device}"))
            .AddColumn("pass").AddColumn(new TableColumn("dropout").RightAligned())
            .AddColumn(new TableColumn("fused ms").RightAligned()).AddColumn(new TableColumn("unfused ms").RightAligned())
            .AddColumn(new TableColumn("speed-up").RightAligned());
        foreach (var r in rows)
            table.AddRow(Markup.Escape(r.Pass), r.Dropout.ToString("0.0"), r.FusedMs.ToString("0.000"), r.UnfusedMs.ToString("0.000"), r.Speedup.ToString("0.00") + "×");
        console.Write(table);
        foreach (var note in notes) stdout.WriteLine("note: " + note);
        return 0;
    }

    /// <summary>Median milliseconds per call over timed loops (two warm-up calls; about 0.5 s in all, at least 3 loops).</summary>
    private static double Time(Action op, Action sync)
    {
        op(); sync();
        var warm = Stopwatch.StartNew();
        op(); sync();
        double once = Math.Max(warm.Elapsed.TotalMilliseconds, 1e-3);
        int inner = Math.Clamp((int)Math.Ceiling(5.0 / once), 1, 100);
        var samples = new List<double>();
        var total = Stopwatch.StartNew();
        while (samples.Count < 3 || (total.Elapsed.TotalSeconds < 0.5 && samples.Count < 50))
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
}
