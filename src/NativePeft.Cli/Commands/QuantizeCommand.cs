using System.CommandLine;
using NativePeft.Conversion;
using NativePeft.IO;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Runtime;
using Spectre.Console;

namespace NativePeft.Cli.Commands;

/// <summary>`nativepeft quantize`: every 2-D linear weight of a safetensors file to NF4/FP4, bitsandbytes layout.</summary>
public static class QuantizeCommand
{
    public static Command Create(TextWriter stdout)
    {
        var input = new Option<FileInfo>("--in") { Description = "input .safetensors checkpoint", Required = true };
        var output = new Option<FileInfo>("--out") { Description = "output .safetensors (written atomically)", Required = true };
        var quantType = new Option<string>("--quant-type") { Description = "nf4 or fp4", DefaultValueFactory = _ => "nf4" };
        quantType.AcceptOnlyFromAmong("nf4", "fp4");
        var blocksize = new Option<int>("--blocksize") { Description = "elements per absmax: a power of two in 32..4096", DefaultValueFactory = _ => 64 };
        blocksize.Validators.Add(r =>
        {
            // Only a value that parsed as an int: otherwise the parser already reports it.
            if (r.Tokens.Count == 0 || !int.TryParse(r.Tokens[^1].Value, out int b)) return;
            if (b < 32 || b > 4096 || (b & (b - 1)) != 0)
                r.AddError($"--blocksize {b}: must be a power of two in 32..4096");
        });
        var doubleQuant = new Option<bool>("--double-quant") { Description = "double-quantize absmax (8-bit, nested blocksize 256)" };
        var device = DeviceOption.Create("cpu", "cpu (the C# reference), or run the kernels on auto|cuda|emulator");
        var skip = new Option<string>("--skip") { Description = "comma-separated name parts of tensors kept as they are", DefaultValueFactory = _ => "embed_tokens,lm_head" };

        var cmd = new Command("quantize", "Quantize the linear weights of a safetensors checkpoint to 4 bits (bitsandbytes layout)")
        {
            input, output, quantType, blocksize, doubleQuant, device, skip,
        };
        cmd.SetAction(parse =>
        {
            var inPath = parse.GetValue(input)!.FullName;
            var outPath = parse.GetValue(output)!.FullName;
            if (!File.Exists(inPath)) throw new CliException($"--in {inPath}: file not found");
            QuantTypes.TryParse(parse.GetValue(quantType)!, out var qt);
            var options = new CheckpointQuantizeOptions
            {
                QuantType = qt,
                Blocksize = parse.GetValue(blocksize),
                DoubleQuant = parse.GetValue(doubleQuant),
                Skip = parse.GetValue(skip)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries),
            };
            var console = Output.Console(stdout);
            // --out is this run's until it returns (another quantize into the same file is refused).
            using var outputLock = OutputLocking.File(outPath, stdout);
            IGpu? gpu = DeviceOption.Open(parse.GetValue(device)!);
            try
            {
                var result = Run(console, inPath, outPath, options, gpu is null ? null : new GpuQuantOps(gpu));
                Render(console, result, outPath, options);
            }
            catch (SafetensorsException e) when (e.FilePath == outPath && OutputFolder.IsWriteFailure(e)) { throw OutputFolder.WriteFailed(outPath, e); }
            catch (SafetensorsException e) { throw new CliException(e.Message, 1, e); }
            catch (Exception e) when (e is ArgumentException or IOException or UnauthorizedAccessException)
            {
                throw new CliException(e.Message, 1, e);
            }
            finally { gpu?.Dispose(); }
            return 0;
        });
        return cmd;
    }

    private static CheckpointQuantizeResult Run(IAnsiConsole console, string inPath, string outPath,
        CheckpointQuantizeOptions options, GpuQuantOps? ops)
    {
        if (!console.Profile.Capabilities.Interactive)
            return CheckpointQuantizer.Quantize(inPath, outPath, options, ops);
        CheckpointQuantizeResult? result = null;
        console.Progress().AutoClear(true).Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask("quantizing");
                var progress = new ActionProgress<(int Done, int Total, string Name)>(p =>
                {
                    task.MaxValue = Math.Max(1, p.Total);
                    task.Value = p.Done;
                    task.Description = p.Name.Length > 0 ? Markup.Escape(p.Name) : "writing";
                });
                result = CheckpointQuantizer.Quantize(inPath, outPath, options, ops, progress);
            });
        return result!;
    }

    private static void Render(IAnsiConsole console, CheckpointQuantizeResult r, string outPath, CheckpointQuantizeOptions o)
    {
        var table = new Table().Border(TableBorder.Rounded)
            .AddColumn("tensor").AddColumn("shape").AddColumn("dtype").AddColumn(new TableColumn("bytes before").RightAligned())
            .AddColumn(new TableColumn("bytes after").RightAligned()).AddColumn(new TableColumn("mean |err|").RightAligned())
            .AddColumn(new TableColumn("rel. err").RightAligned());
        foreach (var t in r.Tensors)
            table.AddRow(Markup.Escape(t.Name), string.Join("x", t.Shape), t.DType.ToString(), t.BytesBefore.ToString("N0"),
                t.BytesAfter.ToString("N0"), t.Quantized ? t.MeanAbsError.ToString("0.000e0") : "kept",
                t.Quantized ? t.RelativeError.ToString("P2") : "");
        table.AddRow("[bold]total[/]", "", "", r.BytesBefore.ToString("N0"), r.BytesAfter.ToString("N0"), "", "");
        console.Write(table);
        console.WriteLine($"{o.QuantType.Name()} blocksize {o.Blocksize}{(o.DoubleQuant ? " + double quant" : "")}: " +
                          $"{r.QuantizedCount} of {r.Tensors.Count} tensors quantized, {Output.Bytes(r.BytesBefore)} -> {Output.Bytes(r.BytesAfter)} " +
                          $"({(double)r.BytesAfter / Math.Max(1, r.BytesBefore):P1}) on {r.Device} in {r.Elapsed.TotalSeconds:0.00} s");
        console.WriteLine($"wrote {outPath}");
    }

}
