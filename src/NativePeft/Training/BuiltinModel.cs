namespace NativePeft.Training;

/// <summary>
/// The shipped built-in base model (<c>--model builtin</c>): a folder <c>builtin-model/</c> next to the assemblies
/// (config.json, model.safetensors in BF16, tokenizer_config.json for the byte tokenizer), copied there by the CLI's
/// build from src/NativePeft.Cli/builtin-model/ and reproduced by <c>nativepeft pretrain</c> (docs/builtin-model.md).
/// </summary>
public static class BuiltinModel
{
    /// <summary>The value of <c>--model</c> that selects it.</summary>
    public const string Name = "builtin";
    public const string FolderName = "builtin-model";

    /// <summary>
    /// The built-in fine-tuning task the built-in model is measured on (<c>--data builtin</c>): <c>upper: w\n</c> → W in
    /// capitals, words of 3..5 letters. Reversal was measured too hard for LoRA on this model within a test's CPU budget
    /// (exact match stayed 0 % after 1500 steps); docs/builtin-model.md has the numbers.
    /// </summary>
    public static Data.BuiltinTaskOptions TaskOptions { get; } = new() { Kind = Data.BuiltinTaskKind.Uppercase };

    /// <summary>The folder next to the running application's assemblies (it may be missing: see <see cref="Require"/>).</summary>
    public static string Directory => Path.Combine(AppContext.BaseDirectory, FolderName);

    /// <summary><see cref="Directory"/>, or a <see cref="DirectoryNotFoundException"/> saying how to make it.</summary>
    public static string Require()
    {
        string dir = Directory;
        if (!File.Exists(Path.Combine(dir, IO.LlamaConfig.FileName)))
            throw new DirectoryNotFoundException($"the built-in model is missing: no {Path.Combine(dir, IO.LlamaConfig.FileName)} " +
                "(rebuild the CLI, or write one with `nativepeft pretrain --out DIR` and pass --model DIR)");
        return dir;
    }
}
