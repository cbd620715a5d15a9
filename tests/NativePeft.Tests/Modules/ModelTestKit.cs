using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Tests.Reference;

namespace NativePeft.Tests.Modules;

/// <summary>Shared tiny configs and host-side tensor helpers for the model tests.</summary>
internal static class ModelTestKit
{
    /// <summary>
    /// hidden 8, intermediate 12, 2 heads, 1 kv head (GQA), head_dim 4, 2 layers, vocab 11, llama3 rope_scaling
    /// with original_max_position_embeddings 16 so that, with theta 10000 (inv_freq 1 and 0.01, wavelengths 6.3 and
    /// 628), one frequency falls in the interpolated band (4..16) and one in the divided band (&gt; 16).
    /// </summary>
    public static LlamaConfig Tiny { get; } = new()
    {
        HiddenSize = 8, IntermediateSize = 12, NumAttentionHeads = 2, NumKeyValueHeads = 1, HeadDim = 4,
        NumHiddenLayers = 2, VocabSize = 11, MaxPositionEmbeddings = 64, RmsNormEps = 1e-5, RopeTheta = 10000,
        RopeScaling = new Llama3RopeScaling(8, 1, 4, 16),
    };

    public const int B = 2, T = 5;

    /// <summary>Token ids [B·T] in [0, 11) and HF-convention labels with some -100.</summary>
    public static (int[] Ids, int[] Labels) TinyBatch()
    {
        int[] ids = [3, 7, 1, 10, 4, 0, 9, 2, 5, 8];
        int[] labels = (int[])ids.Clone();
        labels[2] = -100;  // position 1 of row 0 has no target
        labels[8] = -100;  // position 2 of row 1 has no target
        return (ids, labels);
    }

    public static double[] Get(IOps ops, Tensor t)
    {
        if (t.DType == DType.F64)
        {
            var d = new double[t.Count];
            ops.Download<double>(t, d);
            return d;
        }
        var f = new float[t.Count];
        ops.Download<float>(t, f);
        return Array.ConvertAll(f, v => (double)v);
    }

    public static void Set(IOps ops, Tensor t, double[] values)
    {
        if (t.DType == DType.F64) ops.Upload<double>(values, t);
        else ops.Upload<float>(Array.ConvertAll(values, v => (float)v), t);
    }

    /// <summary>Fills every lora_B with Normal(0, scale²) so the adapter path is not zero.</summary>
    public static void RandomizeLoraB(LlamaModel model, int seed, double scale = 0.5)
    {
        int k = 0;
        foreach (var l in model.LoraLayers)
            Set(model.Ops, l.LoraB, GradCheck.RandomNormal((int)l.LoraB.Count, seed + k++, scale));
    }
}
