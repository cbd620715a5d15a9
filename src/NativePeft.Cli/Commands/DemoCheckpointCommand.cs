using System.CommandLine;
using NativePeft.IO;
using NativePeft.Numerics;

namespace NativePeft.Cli.Commands;

/// <summary>
/// `nativepeft demo-checkpoint`: a small random Llama-shaped bf16 checkpoint with HF tensor names, so the
/// quantizer (and `./build.sh run`) has something real to work on without downloading a model.
/// </summary>
public static class DemoCheckpointCommand
{
    public static Command Create(TextWriter stdout)
    {
        var output = new Option<FileInfo>("--out") { Description = "output .safetensors", Required = true };
        var layers = new Option<int>("--layers") { DefaultValueFactory = _ => 2, Description = "decoder layers" };
        var hidden = new Option<int>("--hidden") { DefaultValueFactory = _ => 512, Description = "hidden size" };
        var intermediate = new Option<int>("--intermediate") { DefaultValueFactory = _ => 1376, Description = "MLP size" };
        var vocab = new Option<int>("--vocab") { DefaultValueFactory = _ => 2048, Description = "vocabulary size" };
        var seed = new Option<int>("--seed") { DefaultValueFactory = _ => 0, Description = "random seed" };
        foreach (var o in new[] { layers, hidden, intermediate, vocab })
            o.Validators.Add(r =>
            {
                if (r.Tokens.Count > 0 && int.TryParse(r.Tokens[^1].Value, out int v) && v <= 0) r.AddError($"{o.Name} must be positive");
            });
        var cmd = new Command("demo-checkpoint", "Write a small random Llama-shaped bf16 checkpoint (HF tensor names)")
        {
            output, layers, hidden, intermediate, vocab, seed,
        };
        cmd.SetAction(parse =>
        {
            var path = parse.GetValue(output)!.FullName;
            var dir = Path.GetDirectoryName(path)!;
            try { Directory.CreateDirectory(dir); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw OutputFolder.WriteFailed(dir, e); }
            using var outputLock = OutputLocking.File(path, stdout);
            var tensors = Build(parse.GetValue(layers), parse.GetValue(hidden), parse.GetValue(intermediate), parse.GetValue(vocab), parse.GetValue(seed));
            try { SafetensorsWriter.Write(path, tensors, new Dictionary<string, string> { ["format"] = "pt" }); }
            catch (SafetensorsException e) when (OutputFolder.IsWriteFailure(e)) { throw OutputFolder.WriteFailed(path, e); }
            long bytes = tensors.Sum(t => (long)t.Data.Length);
            stdout.WriteLine($"wrote {path}: {tensors.Count} tensors, {bytes / 2:N0} bf16 parameters ({Output.Bytes(bytes)})");
            return 0;
        });
        return cmd;
    }

    public static List<SafetensorsTensor> Build(int layers, int hidden, int intermediate, int vocab, int seed)
    {
        var rng = new Random(seed);
        var list = new List<SafetensorsTensor> { Normal(rng, "model.embed_tokens.weight", vocab, hidden) };
        for (int l = 0; l < layers; l++)
        {
            var p = $"model.layers.{l}.";
            list.Add(Ones(p + "input_layernorm.weight", hidden));
            foreach (var proj in new[] { "q_proj", "k_proj", "v_proj", "o_proj" })
                list.Add(Normal(rng, p + "self_attn." + proj + ".weight", hidden, hidden));
            list.Add(Ones(p + "post_attention_layernorm.weight", hidden));
            list.Add(Normal(rng, p + "mlp.gate_proj.weight", intermediate, hidden));
            list.Add(Normal(rng, p + "mlp.up_proj.weight", intermediate, hidden));
            list.Add(Normal(rng, p + "mlp.down_proj.weight", hidden, intermediate));
        }
        list.Add(Ones("model.norm.weight", hidden));
        list.Add(Normal(rng, "lm_head.weight", vocab, hidden));
        return list;
    }

    private static SafetensorsTensor Ones(string name, int n) =>
        SafetensorsTensor.From(name, [n], Enumerable.Repeat(BFloat16.One, n).ToArray());

    /// <summary>N(0, 0.02²) as HF initialises Llama weights (Box–Muller from the seeded RNG).</summary>
    private static SafetensorsTensor Normal(Random rng, string name, int rows, int cols)
    {
        var v = new BFloat16[(long)rows * cols];
        for (long i = 0; i < v.Length; i++)
        {
            double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
            v[i] = (BFloat16)(0.02 * Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2));
        }
        return SafetensorsTensor.From(name, [rows, cols], v);
    }
}
