using NativePeft.Data;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Ops;
using NativePeft.Training;

namespace NativePeft.Tests.Training;

/// <summary>A tiny byte-vocabulary Llama (hidden 32, 2 layers, vocab 259) and a small built-in task for trainer tests.</summary>
internal static class TrainingKit
{
    public static LlamaConfig Config { get; } = new()
    {
        HiddenSize = 32, IntermediateSize = 64, NumAttentionHeads = 4, NumKeyValueHeads = 2, HeadDim = 8,
        NumHiddenLayers = 2, VocabSize = ByteTokenizer.Size, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
    };

    public const int Seq = 32;

    public static LoraSettings Lora(double dropout = 0) => new()
    {
        Rank = 4, Alpha = 8, Dropout = dropout, TargetModules = LoraSettings.KnownTargets,
    };

    public static LlamaModel LoraModel(IOps ops, double dropout = 0, int seed = 7, double std = 0.1) =>
        LlamaModel.CreateRandom(Config, ops, new LlamaModelOptions { Lora = Lora(dropout), Seed = seed }, weightSeed: 3, std: std);

    public static BuiltinTask Task(int train = 64, int eval = 8) =>
        BuiltinTask.Generate(new BuiltinTaskOptions { TrainCount = train, EvalCount = eval, Seed = 99 });

    public static TrainingData Data(int train = 64, int eval = 8) => TrainingData.Builtin(Task(train, eval), ByteTokenizer.Instance);

    /// <summary>Random weights for every tensor of <see cref="Config"/> (for a checkpoint on disk).</summary>
    public static List<SafetensorsTensor> RandomTensors(int seed = 5)
    {
        var rng = new Random(seed);
        return Config.ExpectedTensors().Select(t =>
        {
            int n = (int)t.Shape.Aggregate(1L, (a, b) => a * b);
            bool norm = t.Name.EndsWith("norm.weight", StringComparison.Ordinal);
            var v = new float[n];
            for (int i = 0; i < n; i++) v[i] = norm ? 1f : (float)(0.1 * (rng.NextDouble() * 2 - 1));
            return SafetensorsTensor.From(t.Name, t.Shape, v);
        }).ToList();
    }

    public static float[] Values(IOps ops, Tensor t)
    {
        var v = new float[t.Count];
        ops.Download<float>(t, v);
        return v;
    }
}
