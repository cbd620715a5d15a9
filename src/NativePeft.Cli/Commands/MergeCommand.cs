using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Training;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft merge`: W' = W + scaling·(B·A) for every module of a PEFT LoRA adapter, written as a new Hugging Face
/// checkpoint (<see cref="MergeExport.Write"/>; a bitsandbytes 4-bit base is dequantized first and comes out full
/// precision) plus the base's tokenizer and generation files, so the folder loads without PEFT. Every input is checked
/// before anything is written; on failure nothing is left in --out (a folder the command created is removed).
/// </summary>
public static class MergeCommand
{
    /// <summary>The files next to the weights that a merged model needs to be used as-is (copied when the base has them).</summary>
    public static readonly string[] CopiedFiles =
        ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json"];

    public static Command Create(TextWriter stdout)
    {
        var model = new Option<string>("--model") { Description = "base HF Llama checkpoint folder (full precision or bitsandbytes 4-bit), or 'builtin'", Required = true };
        var adapter = new Option<string>("--adapter") { Description = "PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)", Required = true };
        var output = new Option<string>("--out") { Description = "output folder for the merged checkpoint (new or empty)", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "bf16, fp16 or fp32: dtype of the merged weights", DefaultValueFactory = _ => "bf16" };
        var maxShard = new Option<string>("--max-shard-size") { Description = "largest safetensors shard, e.g. 5GB (transformers' default), 2GiB or bytes", DefaultValueFactory = _ => "5GB" };
        var cmd = new Command("merge", "Merge a LoRA adapter into its base model and write a standalone Hugging Face checkpoint")
        {
            model, adapter, output, dtype, maxShard,
        };
        cmd.SetAction(parse => Run(parse.GetValue(model)!, parse.GetValue(adapter)!, parse.GetValue(output)!, parse.GetValue(dtype)!,
            parse.GetValue(maxShard)!, stdout));
        return cmd;
    }

    public static int Run(string modelDir, string adapterDir, string outDir, string dtypeName, string maxShardText, TextWriter stdout)
    {
        // ---- options on their own
        DType outDType = dtypeName.ToLowerInvariant() switch
        {
            "bf16" or "bfloat16" => DType.BF16,
            "fp16" or "f16" or "float16" => DType.F16,
            "fp32" or "f32" or "float32" => DType.F32,
            _ => throw new CliException($"--dtype {dtypeName}: expected bf16, fp16 or fp32", 2),
        };
        long maxShardBytes = EstimateCommand.ParseSize(maxShardText)
            ?? throw new CliException($"--max-shard-size {maxShardText}: expected a size such as 5GB, 2GiB, 500MB or a number of bytes", 2);

        // ---- files, all checked before --out is touched
        string model = Path.GetFullPath(modelDir == Training.BuiltinModel.Name ? Training.BuiltinModel.Directory : modelDir), adapterPath = Path.GetFullPath(adapterDir), outPath = Path.GetFullPath(outDir);
        if (!Directory.Exists(model)) throw new CliException($"--model {modelDir}: folder not found");
        if (!File.Exists(Path.Combine(model, LlamaConfig.FileName)))
            throw new CliException($"--model {modelDir}: no {LlamaConfig.FileName} (not a Hugging Face model folder)");
        if (File.Exists(outPath)) throw new CliException($"--out {outDir}: is a file");
        if (OutputFolder.HasContent(outPath))
            throw new CliException($"--out {outDir}: the folder exists and is not empty (choose a new one)");
        if (outPath == model || outPath == adapterPath)
            throw new CliException($"--out {outDir}: is the {(outPath == model ? "--model" : "--adapter")} folder; write the merged model to a new one");

        PeftAdapter lora;
        try
        {
            lora = PeftAdapter.Load(adapterPath);
        }
        catch (Exception e) when (e is PeftAdapterException or SafetensorsException or IOException or UnauthorizedAccessException)
        {
            throw new CliException($"--adapter {adapterDir}: {Strip(e.Message, adapterPath)}", 1, e);
        }

        HfCheckpoint ck;
        try
        {
            ck = HfCheckpoint.Open(model);
        }
        catch (Exception e) when (ModelSession.IsModelFileError(e))
        {
            throw new CliException($"--model {modelDir}: {e.Message}", 1, e);
        }

        var watch = Stopwatch.StartNew();
        using (ck)
        {
            // --out is this run's until it returns; a folder it creates goes again when nothing is written into it.
            using var outputLock = OutputLocking.Folder(outPath, stdout);
            if (OutputFolder.HasContent(outPath))
                throw new CliException($"--out {outDir}: the folder exists and is not empty (choose a new one)");
            bool quantized = ck.IsQuantizedCheckpoint;
            try
            {
                MergeExport.Write(outPath, ck, lora, outDType, maxShardBytes);
                foreach (string name in CopiedFiles)
                {
                    string src = Path.Combine(model, name);
                    if (File.Exists(src)) File.Copy(src, Path.Combine(outPath, name));
                }
            }
            catch (Exception e) when (e is PeftAdapterException or NonFiniteValuesException || ModelSession.IsModelFileError(e))
            {
                outputLock.RemoveContents();
                if (e is not PeftAdapterException && OutputFolder.IsWriteFailure(e)) throw OutputFolder.WriteFailed(outPath, e);
                string message = e switch
                {
                    _ when e.GetBaseException() is NonFiniteValuesException nf => $"--adapter {adapterDir} merged into --model {modelDir}: {nf.Message}",
                    PeftAdapterException p => $"--adapter {adapterDir} does not fit --model {modelDir} (was it trained on another base model?): " + Problems(p.Problems),
                    HfCheckpointException h when h.Path.StartsWith(outPath, StringComparison.Ordinal) => $"--out {outDir}: {e.Message}",
                    _ => $"merge failed: {e.Message}",
                };
                throw new CliException(message, 1, e);
            }
            catch
            {
                outputLock.RemoveContents();
                throw;
            }

            // ---- what was written
            var files = Directory.GetFiles(outPath).Where(f => Path.GetFileName(f) != OutputLock.FileName).ToArray();
            var shards = files.Where(f => f.EndsWith(".safetensors", StringComparison.Ordinal)).Order(StringComparer.Ordinal).ToList();
            long weightBytes = shards.Sum(f => new FileInfo(f).Length);
            long totalBytes = files.Sum(f => new FileInfo(f).Length);
            int tensors = ck.Config.ExpectedTensors().Count();
            var c = lora.Config;
            string scaling = lora.Scaling.ToString("0.####", CultureInfo.InvariantCulture);
            stdout.WriteLine($"merged {lora.Modules.Count} LoRA modules (r={c.R}, lora_alpha={c.LoraAlpha.ToString(CultureInfo.InvariantCulture)}" +
                             $"{(c.UseRslora ? ", rslora" : "")}, scaling {scaling}; {string.Join(",", c.TargetModules)} in {lora.Modules.Select(m => m.Layer).Distinct().Count()} layers) " +
                             $"into {Path.GetFileName(model)}{(quantized ? " (4-bit base dequantized to fp32 before merging)" : "")}");
            stdout.WriteLine($"wrote {tensors} tensors in {outDType.TorchName()}, " +
                             $"{Output.Bytes(weightBytes)} ({weightBytes.ToString(CultureInfo.InvariantCulture)} bytes) in {shards.Count} shard{(shards.Count == 1 ? "" : "s")}" +
                             $" (--max-shard-size {maxShardText}), {files.Length} files, {Output.Bytes(totalBytes)} in all, in {watch.Elapsed.TotalSeconds:0.0} s");
            stdout.WriteLine($"merged model: {outPath}");
        }
        return 0;
    }

    /// <summary>The message with a leading "path: " dropped (the caller names the folder itself).</summary>
    private static string Strip(string message, string path) =>
        message.StartsWith(path + ": ", StringComparison.Ordinal) ? message[(path.Length + 2)..] : message;

    /// <summary>The first problems, one per line, and how many more.</summary>
    private static string Problems(IReadOnlyList<string> problems)
    {
        const int Shown = 3;
        string text = string.Join("", problems.Take(Shown).Select(p => "\n  - " + p));
        return problems.Count > Shown ? text + $"\n  … and {problems.Count - Shown} more" : text;
    }
}
