using System.CommandLine;
using NativePeft.Conversion;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;

namespace NativePeft.Cli.Commands;

/// <summary>`nativepeft dequantize`: bitsandbytes 4-bit weights (ours or bitsandbytes') back to plain tensors.</summary>
public static class DequantizeCommand
{
    public static Command Create(TextWriter stdout)
    {
        var input = new Option<FileInfo>("--in") { Description = "a .safetensors file with bitsandbytes 4-bit weights", Required = true };
        var output = new Option<FileInfo>("--out") { Description = "output .safetensors (written atomically)", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "output dtype; default: the dtype each quant state records" };
        dtype.AcceptOnlyFromAmong("bf16", "fp16", "fp32");
        var device = DeviceOption.Create("cpu", "cpu (the C# reference), or run the kernels on auto|cuda|emulator");
        var cmd = new Command("dequantize", "Dequantize the bitsandbytes 4-bit weights of a safetensors file") { input, output, dtype, device };
        cmd.SetAction(parse =>
        {
            var inPath = parse.GetValue(input)!.FullName;
            var outPath = parse.GetValue(output)!.FullName;
            if (!File.Exists(inPath)) throw new CliException($"--in {inPath}: file not found");
            DType? target = parse.GetValue(dtype) switch { "bf16" => DType.BF16, "fp16" => DType.F16, "fp32" => DType.F32, _ => null };
            using var outputLock = OutputLocking.File(outPath, stdout);
            using var gpu = DeviceOption.Open(parse.GetValue(device)!);
            CheckpointQuantizeResult result;
            try
            {
                result = CheckpointQuantizer.Dequantize(inPath, outPath, target, gpu is null ? null : new GpuQuantOps(gpu));
            }
            catch (SafetensorsException e) when (e.FilePath == outPath && OutputFolder.IsWriteFailure(e)) { throw OutputFolder.WriteFailed(outPath, e); }
            catch (SafetensorsException e) { throw new CliException(e.Message, 1, e); }
            catch (Exception e) when (e is ArgumentException or IOException or UnauthorizedAccessException)
            {
                throw new CliException(e.Message, 1, e);
            }
            stdout.WriteLine($"{result.QuantizedCount} 4-bit weights dequantized, {result.Tensors.Count - result.QuantizedCount} tensors kept: " +
                              $"{Output.Bytes(result.BytesBefore)} -> {Output.Bytes(result.BytesAfter)} on {result.Device}");
            stdout.WriteLine($"wrote {outPath}");
            return 0;
        });
        return cmd;
    }
}
