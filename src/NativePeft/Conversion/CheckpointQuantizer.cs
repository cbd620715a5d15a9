using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;

namespace NativePeft.Conversion;

/// <summary>What <see cref="CheckpointQuantizer"/> does to a checkpoint.</summary>
public sealed record CheckpointQuantizeOptions
{
    public QuantType QuantType { get; init; } = QuantType.Nf4;
    public int Blocksize { get; init; } = 64;
    /// <summary>Double-quantize absmax (bitsandbytes' compress_statistics).</summary>
    public bool DoubleQuant { get; init; }
    /// <summary>Tensors whose name contains one of these are kept as they are (as bitsandbytes skips lm_head).</summary>
    public IReadOnlyList<string> Skip { get; init; } = ["embed_tokens", "lm_head"];
}

/// <summary>One tensor of the output: bytes before and after, and the round-trip error of the 4-bit weight.</summary>
public sealed record TensorQuantizeReport(
    string Name, long[] Shape, DType DType, bool Quantized, long BytesBefore, long BytesAfter,
    double MeanAbsError, double MeanAbsValue, double MaxAbsError)
{
    /// <summary>Mean |error| relative to mean |w|; 0 for tensors kept as they are.</summary>
    public double RelativeError => MeanAbsValue > 0 ? MeanAbsError / MeanAbsValue : 0;
}

public sealed record CheckpointQuantizeResult(IReadOnlyList<TensorQuantizeReport> Tensors, TimeSpan Elapsed, string Device)
{
    public long BytesBefore => Tensors.Sum(t => t.BytesBefore);
    public long BytesAfter => Tensors.Sum(t => t.BytesAfter);
    public int QuantizedCount => Tensors.Count(t => t.Quantized);
}

/// <summary>
/// Quantizes every 2-D linear weight of a safetensors checkpoint to 4 bits and writes it in the bitsandbytes
/// layout (docs/quant-contract.md), the other tensors unchanged. On the CPU reference or, given <see cref="GpuQuantOps"/>,
/// with the kernels of kernels/nf4.cu. The output is written atomically: on any error nothing is at the path.
/// </summary>
public static class CheckpointQuantizer
{
    /// <summary>A linear weight: a 2-D float tensor named *.weight, not skipped.</summary>
    public static bool IsLinearWeight(SafetensorsTensorInfo t, IReadOnlyList<string> skip) =>
        t.Shape.Length == 2 && t.DType is (DType.F32 or DType.BF16 or DType.F16)
        && t.Name.EndsWith(".weight", StringComparison.Ordinal)
        && !skip.Any(s => s.Length > 0 && t.Name.Contains(s, StringComparison.Ordinal));

    public static CheckpointQuantizeResult Quantize(string inputPath, string outputPath, CheckpointQuantizeOptions options,
        GpuQuantOps? gpu = null, IProgress<(int Done, int Total, string Name)>? progress = null, ILogger? logger = null)
    {
        logger ??= NullLogger.Instance;
        Quant4Bit.ValidateBlocksize(options.Blocksize);
        CheckOutputPath(inputPath, outputPath);

        var clock = Stopwatch.StartNew();
        using var file = SafetensorsFile.Open(inputPath);
        var reports = new List<TensorQuantizeReport>();
        var output = new List<SafetensorsTensor>();
        int done = 0;
        foreach (var info in file.Tensors)
        {
            progress?.Report((done, file.Tensors.Count, info.Name));
            if (!IsLinearWeight(info, options.Skip))
            {
                output.Add(new SafetensorsTensor(info.Name, info.DType, info.Shape, file.GetMemory(info.Name)));
                reports.Add(new TensorQuantizeReport(info.Name, info.Shape, info.DType, false, info.ByteLength, info.ByteLength, 0, 0, 0));
            }
            else
            {
                var prefix = info.Name[..^"weight".Length];
                var q = QuantizeOne(file, info, options, gpu);
                var tensors = BitsAndBytes4Bit.ToTensors(prefix, q);
                output.AddRange(tensors);
                var (mean, meanAbs, max) = RoundTripError(file, info, q);
                reports.Add(new TensorQuantizeReport(info.Name, info.Shape, info.DType, true, info.ByteLength,
                    tensors.Sum(t => (long)t.Data.Length), mean, meanAbs, max));
                logger.LogDebug("quantized {Tensor} [{Shape}]: mean |error| {Error:g3}", info.Name, string.Join("x", info.Shape), mean);
            }
            done++;
        }
        progress?.Report((done, file.Tensors.Count, ""));

        var metadata = new Dictionary<string, string>(file.Metadata);
        metadata.TryAdd("format", "pt");
        SafetensorsWriter.Write(outputPath, output, metadata);
        var device = gpu?.Gpu.Properties.Name ?? "CPU reference";
        logger.LogInformation("quantized {Count} of {Total} tensors of {Input} to {Type} (blocksize {Blocksize}{Dq}) on {Device} in {Seconds:0.00} s",
            reports.Count(r => r.Quantized), reports.Count, inputPath, options.QuantType.Name(), options.Blocksize,
            options.DoubleQuant ? ", double quant" : "", device, clock.Elapsed.TotalSeconds);
        return new CheckpointQuantizeResult(reports, clock.Elapsed, device);
    }

    private const string QuantStateMarker = "weight.quant_state.bitsandbytes__";

    /// <summary>The module prefixes ("model.layers.0.mlp.up_proj.") of the bitsandbytes 4-bit weights in a file.</summary>
    public static IReadOnlyList<string> FourBitPrefixes(SafetensorsFile file) =>
        file.Tensors.Select(t => t.Name)
            .Where(n => n.EndsWith(QuantStateMarker + "nf4", StringComparison.Ordinal) || n.EndsWith(QuantStateMarker + "fp4", StringComparison.Ordinal))
            .Select(n => n[..n.LastIndexOf(QuantStateMarker, StringComparison.Ordinal)])
            .ToList();

    /// <summary>
    /// The inverse: every bitsandbytes 4-bit weight of <paramref name="inputPath"/> (ours or one bitsandbytes wrote)
    /// back to a plain <c>weight</c> tensor in <paramref name="dtype"/> (null: the dtype its quant state records),
    /// the other tensors unchanged. Written atomically.
    /// </summary>
    public static CheckpointQuantizeResult Dequantize(string inputPath, string outputPath, DType? dtype = null,
        GpuQuantOps? gpu = null, ILogger? logger = null)
    {
        logger ??= NullLogger.Instance;
        if (dtype is { } d && d is not (DType.F32 or DType.BF16 or DType.F16))
            throw new ArgumentException($"dtype must be F32, BF16 or F16, got {d}", nameof(dtype));
        CheckOutputPath(inputPath, outputPath);
        var clock = Stopwatch.StartNew();
        using var file = SafetensorsFile.Open(inputPath);
        var prefixes = FourBitPrefixes(file);
        var owner = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var prefix in prefixes)
            foreach (var t in file.Tensors.Where(t => t.Name == prefix + "weight" || t.Name.StartsWith(prefix + "weight.", StringComparison.Ordinal)))
                owner[t.Name] = prefix;
        var reports = new List<TensorQuantizeReport>();
        var output = new List<SafetensorsTensor>();
        foreach (var info in file.Tensors)
        {
            if (!owner.TryGetValue(info.Name, out var prefix))
            {
                output.Add(new SafetensorsTensor(info.Name, info.DType, info.Shape, file.GetMemory(info.Name)));
                reports.Add(new TensorQuantizeReport(info.Name, info.Shape, info.DType, false, info.ByteLength, info.ByteLength, 0, 0, 0));
                continue;
            }
            if (info.Name != prefix + "weight") continue; // the state tensors of a 4-bit weight go with it
            var q = BitsAndBytes4Bit.Load(file, prefix);
            var target = dtype ?? q.State.Dtype;
            var restored = DequantizeOne(prefix + "weight", q, target, gpu);
            long before = file.Tensors.Where(t => owner.TryGetValue(t.Name, out var p) && p == prefix).Sum(t => t.ByteLength);
            output.Add(restored);
            reports.Add(new TensorQuantizeReport(restored.Name, q.State.Shape, target, true, before, restored.Data.Length, 0, 0, 0));
        }
        var metadata = new Dictionary<string, string>(file.Metadata);
        metadata.TryAdd("format", "pt");
        SafetensorsWriter.Write(outputPath, output, metadata);
        var device = gpu?.Gpu.Properties.Name ?? "CPU reference";
        logger.LogInformation("dequantized {Count} 4-bit weights of {Input} on {Device}", prefixes.Count, inputPath, device);
        return new CheckpointQuantizeResult(reports, clock.Elapsed, device);
    }

    private static SafetensorsTensor DequantizeOne(string name, Quantized4BitTensor q, DType target, GpuQuantOps? gpu) => target switch
    {
        DType.F32 => SafetensorsTensor.From(name, q.State.Shape, DequantizeAs<float>(q, gpu)),
        DType.BF16 => SafetensorsTensor.From(name, q.State.Shape, DequantizeAs<BFloat16>(q, gpu)),
        _ => SafetensorsTensor.From(name, q.State.Shape, DequantizeAs<Half>(q, gpu)),
    };

    private static T[] DequantizeAs<T>(Quantized4BitTensor q, GpuQuantOps? gpu) where T : unmanaged
    {
        var values = new T[q.ElementCount];
        if (gpu is null)
        {
            q.Dequantize<T>(values);
            return values;
        }
        float[] absmax = q.State.IsDoubleQuant ? DecodeAbsmaxOn(gpu, q.State.Nested!) : q.State.Absmax!;
        gpu.Dequantize4bit<T>(q.State.QuantType, q.Packed, absmax, q.State.Blocksize, values);
        return values;
    }

    private static float[] DecodeAbsmaxOn(GpuQuantOps gpu, DoubleQuantState nested)
    {
        var absmax = new float[nested.QuantizedAbsmax.Length];
        gpu.DequantizeAbsmaxDoubleQuant(nested, absmax);
        return absmax;
    }

    private static void CheckOutputPath(string inputPath, string outputPath)
    {
        if (Path.GetFullPath(inputPath) == Path.GetFullPath(outputPath))
            throw new ArgumentException($"the output path {outputPath} is the input file: choose another", nameof(outputPath));
        var outDir = Path.GetDirectoryName(Path.GetFullPath(outputPath))!;
        if (!Directory.Exists(outDir))
            throw new DirectoryNotFoundException($"the output folder {outDir} does not exist");
    }

    private static Quantized4BitTensor QuantizeOne(SafetensorsFile file, SafetensorsTensorInfo info, CheckpointQuantizeOptions o, GpuQuantOps? gpu)
    {
        if (gpu is null)
        {
            return info.DType switch
            {
                DType.F32 => Quantized4BitTensor.Quantize(file.GetSpan<float>(info.Name), info.Shape, o.QuantType, o.Blocksize, o.DoubleQuant, info.DType),
                DType.BF16 => Quantized4BitTensor.Quantize(file.GetSpan<BFloat16>(info.Name), info.Shape, o.QuantType, o.Blocksize, o.DoubleQuant, info.DType),
                _ => Quantized4BitTensor.Quantize(file.GetSpan<Half>(info.Name), info.Shape, o.QuantType, o.Blocksize, o.DoubleQuant, info.DType),
            };
        }
        var (packed, absmax) = info.DType switch
        {
            DType.F32 => gpu.Quantize4bit(o.QuantType, file.GetSpan<float>(info.Name), o.Blocksize),
            DType.BF16 => gpu.Quantize4bit(o.QuantType, file.GetSpan<BFloat16>(info.Name), o.Blocksize),
            _ => gpu.Quantize4bit(o.QuantType, file.GetSpan<Half>(info.Name), o.Blocksize),
        };
        var nested = o.DoubleQuant ? gpu.QuantizeAbsmaxDoubleQuant(absmax) : null;
        return Quantized4BitTensor.FromParts(packed, absmax, info.Shape, o.QuantType, o.Blocksize, nested, info.DType);
    }

    /// <summary>Mean and max |w − dequantize(quantize(w))| in fp32 against the original values, and mean |w|.</summary>
    private static (double MeanAbsError, double MeanAbsValue, double MaxAbsError) RoundTripError(
        SafetensorsFile file, SafetensorsTensorInfo info, Quantized4BitTensor q)
    {
        float[] restored = q.DequantizeToSingle();
        float[] original = new float[restored.Length];
        switch (info.DType)
        {
            case DType.F32: file.GetSpan<float>(info.Name).CopyTo(original); break;
            case DType.BF16: BFloat16.ToSingle(file.GetSpan<BFloat16>(info.Name), original); break;
            default:
                var h = file.GetSpan<Half>(info.Name);
                for (int i = 0; i < h.Length; i++) original[i] = (float)h[i];
                break;
        }
        double sumErr = 0, sumAbs = 0, maxErr = 0;
        for (int i = 0; i < original.Length; i++)
        {
            double e = Math.Abs((double)original[i] - restored[i]);
            sumErr += e;
            sumAbs += Math.Abs(original[i]);
            if (e > maxErr) maxErr = e;
        }
        int n = Math.Max(1, original.Length);
        return (sumErr / n, sumAbs / n, maxErr);
    }
}
