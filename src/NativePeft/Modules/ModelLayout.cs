using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;

namespace NativePeft.Modules;

/// <summary>What a tensor of the <see cref="ModelLayout"/> is for (the memory plans' categories).</summary>
public enum TensorCategory
{
    /// <summary>embed_tokens, lm_head, the norms and the projections (dense, 4-bit packed, or a narrower stored base);
    /// with mixed-precision full fine-tuning also each fp32 master weight.</summary>
    BaseWeights,
    /// <summary>A 4-bit weight's absmax (fp32 per block, or bitsandbytes' double-quantized codes, nested absmax, map and offset).</summary>
    QuantizationState,
    /// <summary>lora_A and lora_B.</summary>
    Adapters,
    /// <summary>One per trainable tensor (the adapters, or every dense base tensor with full fine-tuning).</summary>
    Gradients,
    /// <summary>The shared dequantization/widening buffer of a 4-bit or narrower-stored base (the largest projection).</summary>
    DequantScratch,
    /// <summary>What the model keeps for one batch shape: ids, hidden states, saved block tensors, backward buffers.</summary>
    Activations,
    /// <summary>The LoRA layers' per-batch scratch (xa, dxa, and with mixed precision the bf16 working copies of A and B).</summary>
    LoraScratch,
    /// <summary>The RoPE cos/sin tables.</summary>
    RopeTables,
    /// <summary>A KV cache's K and V per layer.</summary>
    KvCache,
    /// <summary>A KV cache's forward workspace (prefill and decode share it).</summary>
    CacheWorkspace,
}

/// <summary>
/// One tensor the model allocates: its name, what it is for, the pool arena it comes from, its dtype and shape.
/// <see cref="LlamaModel"/> allocates exactly these (by name) and the memory plans sum them.
/// </summary>
public sealed record TensorSpec(string Name, TensorCategory Category, MemoryRegion Region, DType DType, long[] Shape)
{
    /// <summary>Elements (the product of the shape).</summary>
    public long Count
    {
        get
        {
            long n = 1;
            foreach (long d in Shape) n = checked(n * d);
            return n;
        }
    }

    /// <summary>The bytes it occupies: at least 1, rounded up to <paramref name="alignment"/> (as <see cref="TensorMemory.AlignedBytes"/>).</summary>
    public long Bytes(int alignment = 1) => TensorMemory.AlignedBytes(DType, Count, alignment);

    /// <summary>The shape as the allocator takes it (each dimension checked to fit an int).</summary>
    public int[] IntShape() => Array.ConvertAll(Shape, d => checked((int)d));

    public override string ToString() => $"{Name} {DType} [{string.Join(", ", Shape)}] ({Category}, {Region})";
}

/// <summary>
/// The inputs of the <see cref="ModelLayout"/>: what decides which tensors the model holds and their dtypes. Made from
/// the <see cref="LlamaModelOptions"/> a model is loaded with (<see cref="For"/>) or from a plan's options.
/// </summary>
public sealed record ModelLayoutOptions
{
    public DType ComputeDType { get; init; } = DType.F32;
    /// <summary>Every dense base tensor is trained (a gradient each; with BF16 compute an fp32 master weight too).</summary>
    public bool FullFineTuning { get; init; }
    /// <summary>The adapters' r; 0 for no adapters.</summary>
    public int LoraRank { get; init; }
    /// <summary>The projections (short names) that get an adapter.</summary>
    public IReadOnlyList<string> LoraTargets { get; init; } = [];
    /// <summary>The projections are 4-bit (quantized on load, or a bitsandbytes checkpoint as stored).</summary>
    public bool FourBit { get; init; }
    public int Blocksize { get; init; } = 64;
    /// <summary>4-bit: bitsandbytes' double-quantized absmax kept as stored; otherwise one fp32 absmax per block.</summary>
    public bool DoubleQuant { get; init; } = true;
    /// <summary>The dense projections' storage when it differs from the compute dtype (frozen, widened per GEMM); null = the compute dtype.</summary>
    public DType? BaseWeightDType { get; init; }
    /// <summary>The embedding table is in host memory (not in the layout).</summary>
    public bool EmbeddingOnHost { get; init; }
    /// <summary>Gradient checkpointing: one block's saved tensors instead of every block's.</summary>
    public bool Recompute { get; init; }

    /// <summary>rstd, lse, the RoPE tables and the logits of the cached forward: F32 with BF16 compute, the compute dtype otherwise.</summary>
    public DType StatisticsDType => ComputeDType == DType.BF16 ? DType.F32 : ComputeDType;
    /// <summary>LoRA A/B and every gradient (and full fine-tuning's master weights): F32 with BF16 compute, the compute dtype otherwise.</summary>
    public DType AdapterDType => ComputeDType == DType.BF16 ? DType.F32 : ComputeDType;
    /// <summary>The dense projections are stored narrower than they are computed in (the widening scratch is needed).</summary>
    public bool Widened => !FourBit && BaseWeightDType is { } b && b != ComputeDType;
    public bool HasLora => LoraRank > 0 && LoraTargets.Count > 0;

    /// <summary>
    /// The layout of a model loaded with <paramref name="options"/>; <paramref name="stored"/>: the blocksize and
    /// double quantization of a bitsandbytes checkpoint's 4-bit weights (loaded as stored), or null.
    /// </summary>
    public static ModelLayoutOptions For(LlamaModelOptions options, (int Blocksize, bool DoubleQuant)? stored = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        return new ModelLayoutOptions
        {
            ComputeDType = options.ComputeDType,
            FullFineTuning = options.FullFineTuning,
            LoraRank = options.Lora?.Rank ?? 0,
            LoraTargets = options.Lora?.TargetModules ?? [],
            FourBit = options.Quantization != BaseQuantization.None || stored is not null,
            Blocksize = stored?.Blocksize ?? options.Blocksize,
            DoubleQuant = stored?.DoubleQuant ?? options.DoubleQuant,
            BaseWeightDType = options.BaseWeightDType,
            EmbeddingOnHost = options.EmbeddingOnHost,
            Recompute = options.Recompute,
        };
    }
}

/// <summary>
/// The one table of the tensors a <see cref="LlamaModel"/> allocates (llm.c's fill_in_activation_sizes): every
/// tensor's name, category, arena, dtype and shape, computed from the config and the <see cref="ModelLayoutOptions"/>
/// alone. The model allocates each tensor it holds by looking its name up here; the memory plans
/// (Planning.MemoryPlan, Planning.InferencePlan) sum the same lists by category. What the ops allocate inside a call
/// and the optimizer's state are not model tensors and stay terms of the plans.
/// </summary>
public static class ModelLayout
{
    /// <summary>The MLP's [N, I] tensors: gate, up and silu(gate)·up.</summary>
    private static readonly string[] MlpNames = ["gate", "up", "silu_up"];

    /// <summary>The name of the shared dequantization/widening buffer.</summary>
    public const string DequantScratchName = "dequant_scratch";

    /// <summary>
    /// What lives for the model's lifetime (the persistent arena), in the order the model allocates it: per HF tensor
    /// name the weight (full fine-tuning: its ".grad"; with BF16 compute the name is the fp32 master, ".working" the
    /// bf16 copy), a 4-bit weight's packed codes under its name and its state under name + ".absmax" (and
    /// ".nested_absmax", ".nested_quant_map", ".nested_offset"), the adapters under PEFT's names (and ".grad"), and
    /// <see cref="DequantScratchName"/>.
    /// </summary>
    public static IReadOnlyList<TensorSpec> Parameters(LlamaConfig config, ModelLayoutOptions options)
    {
        Check(config, options);
        var o = options;
        DType d = o.ComputeDType, ad = o.AdapterDType;
        long C = config.HiddenSize, V = config.VocabSize;
        var list = new List<TensorSpec>();
        void Add(string name, TensorCategory category, DType dtype, params long[] shape) =>
            list.Add(new TensorSpec(name, category, MemoryRegion.Persistent, dtype, shape));

        void Dense(string name, params long[] shape)
        {
            if (o.FullFineTuning && ad != d)
            {
                Add(name, TensorCategory.BaseWeights, ad, shape);               // the fp32 master weight (trained)
                Add(name + ".working", TensorCategory.BaseWeights, d, shape);   // the bf16 working copy (computed with)
                Add(name + ".grad", TensorCategory.Gradients, ad, shape);
                return;
            }
            Add(name, TensorCategory.BaseWeights, d, shape);
            if (o.FullFineTuning) Add(name + ".grad", TensorCategory.Gradients, d, shape);
        }

        if (!o.EmbeddingOnHost) Dense("model.embed_tokens.weight", V, C);
        bool scratch = false;
        for (int l = 0; l < config.NumHiddenLayers; l++)
        {
            string prefix = $"model.layers.{l}.";
            Dense(prefix + "input_layernorm.weight", C);
            foreach (var (shortName, path, outF, inF) in Projections(config))
            {
                string name = prefix + path + ".weight";
                long n = outF * inF;
                if (o.FourBit)
                {
                    Add(name, TensorCategory.BaseWeights, DType.U8, Quant4Bit.PackedLength(n));
                    long blocks = Quant4Bit.BlockCount(n, o.Blocksize);
                    if (o.DoubleQuant)
                    {
                        Add(name + ".absmax", TensorCategory.QuantizationState, DType.U8, blocks);
                        Add(name + ".nested_absmax", TensorCategory.QuantizationState, DType.F32,
                            (blocks + DoubleQuantState.DefaultNestedBlockSize - 1) / DoubleQuantState.DefaultNestedBlockSize);
                        Add(name + ".nested_quant_map", TensorCategory.QuantizationState, DType.F32, 256);
                        Add(name + ".nested_offset", TensorCategory.QuantizationState, DType.F32, 1);
                    }
                    else Add(name + ".absmax", TensorCategory.QuantizationState, DType.F32, blocks);
                }
                else if (o.Widened) Add(name, TensorCategory.BaseWeights, o.BaseWeightDType!.Value, outF, inF);
                else Dense(name, outF, inF);
                if ((o.FourBit || o.Widened) && !scratch)
                {
                    scratch = true;
                    Add(DequantScratchName, TensorCategory.DequantScratch, d, Projections(config).Max(p => p.Out * p.In));
                }
                if (o.HasLora && o.LoraTargets.Contains(shortName))
                {
                    string peft = "base_model.model." + prefix + path;
                    long r = o.LoraRank;
                    Add(peft + ".lora_A.weight", TensorCategory.Adapters, ad, r, inF);
                    Add(peft + ".lora_B.weight", TensorCategory.Adapters, ad, outF, r);
                    Add(peft + ".lora_A.weight.grad", TensorCategory.Gradients, ad, r, inF);
                    Add(peft + ".lora_B.weight.grad", TensorCategory.Gradients, ad, outF, r);
                }
            }
            Dense(prefix + "post_attention_layernorm.weight", C);
        }
        Dense("model.norm.weight", C);
        if (!config.TieWordEmbeddings) Dense("lm_head.weight", V, C);
        return list;
    }

    /// <summary>
    /// What the model allocates for a batch shape (B·T = N tokens; the transient arena): ids, labels, positions; the
    /// L + 1 hidden states; the saved tensors of every block ("block.{i}.*", one block with recompute); the final
    /// norm's output and rstd, the loss lse; the backward's buffers ("d_*"); and with adapters the LoRA scratch
    /// ("lora.*").
    /// </summary>
    public static IReadOnlyList<TensorSpec> Activations(LlamaConfig config, ModelLayoutOptions options, int batch, int seqLen)
    {
        Check(config, options);
        var o = options;
        DType d = o.ComputeDType, s = o.StatisticsDType;
        long N = checked((long)batch * seqLen);
        long C = config.HiddenSize, QD = config.QueryDim, KVD = config.KeyValueDim, I = config.IntermediateSize;
        var list = new List<TensorSpec>();
        void Add(string name, DType dtype, params long[] shape) =>
            list.Add(new TensorSpec(name, TensorCategory.Activations, MemoryRegion.Transient, dtype, shape));

        Add("input_ids", DType.I32, N);
        Add("labels", DType.I32, N);
        Add("position_ids", DType.I32, N);
        for (int i = 0; i <= config.NumHiddenLayers; i++) Add($"hidden.{i}", d, N, C);
        int blocks = o.Recompute ? 1 : config.NumHiddenLayers;
        for (int i = 0; i < blocks; i++)
        {
            string p = $"block.{i}.";
            Add(p + "n1", d, N, C);
            Add(p + "rstd1", s, N);
            Add(p + "q", d, N, QD);
            Add(p + "k", d, N, KVD);
            Add(p + "v", d, N, KVD);
            Add(p + "attention", d, N, QD);
            Add(p + "lse", s, batch, config.NumAttentionHeads, seqLen);
            Add(p + "h", d, N, C);
            Add(p + "n2", d, N, C);
            Add(p + "rstd2", s, N);
            foreach (string mlp in MlpNames) Add(p + mlp, d, N, I);
        }
        Add("norm_out", d, N, C);
        Add("norm_rstd", s, N);
        Add("loss_lse", s, N);
        Add("d_residual", d, N, C);
        Add("d_normed", d, N, C);
        Add("d_attention", d, N, QD);
        Add("d_q", d, N, QD);
        Add("d_k", d, N, KVD);
        Add("d_v", d, N, KVD);
        foreach (string mlp in new[] { "d_silu_up", "d_gate", "d_up" }) Add(mlp, d, N, I);
        if (Lora(config, o) is { } lora)
        {
            void Scratch(string name, long count) =>
                list.Add(new TensorSpec(name, TensorCategory.LoraScratch, MemoryRegion.Transient, d, [count]));
            // xa and dxa of one group's adapters [N, Σ r] (dropout(x) and its mask are never stored).
            Scratch("lora.xa", N * lora.GroupRank);
            Scratch("lora.dxa", N * lora.GroupRank);
            // Mixed precision: the bf16 working copies of a group's A [Σ r, max in] and of one B [max out, max r].
            if (o.AdapterDType != d)
            {
                Scratch("lora.a_work", lora.GroupRank * lora.MaxIn);
                Scratch("lora.b_work", lora.MaxOut * o.LoraRank);
            }
        }
        return list;
    }

    /// <summary>The RoPE cos/sin tables for sequences up to <paramref name="seqLen"/>: [max(T, min(64, max positions)), D/2] each.</summary>
    public static IReadOnlyList<TensorSpec> RopeTables(LlamaConfig config, ModelLayoutOptions options, int seqLen)
    {
        Check(config, options);
        long rows = RopeRows(config, seqLen), half = config.HeadDim / 2;
        return
        [
            new TensorSpec("rope.cos", TensorCategory.RopeTables, MemoryRegion.RopeTables, options.StatisticsDType, [rows, half]),
            new TensorSpec("rope.sin", TensorCategory.RopeTables, MemoryRegion.RopeTables, options.StatisticsDType, [rows, half]),
        ];
    }

    /// <summary>The RoPE tables' rows for sequences up to <paramref name="seqLen"/>: max(T, min(64, max_position_embeddings)).</summary>
    public static int RopeRows(LlamaConfig config, int seqLen) => Math.Max(seqLen, Math.Min(64, config.MaxPositionEmbeddings));

    /// <summary>A KV cache of <paramref name="maxLength"/> tokens: per layer K (after RoPE) and V [max length, Hkv·D] in the compute dtype.</summary>
    public static IReadOnlyList<TensorSpec> KvCache(LlamaConfig config, ModelLayoutOptions options, int maxLength)
    {
        Check(config, options);
        var list = new List<TensorSpec>();
        for (int l = 0; l < config.NumHiddenLayers; l++)
        {
            list.Add(new TensorSpec($"layers.{l}.k_cache", TensorCategory.KvCache, MemoryRegion.Transient, options.ComputeDType, [maxLength, config.KeyValueDim]));
            list.Add(new TensorSpec($"layers.{l}.v_cache", TensorCategory.KvCache, MemoryRegion.Transient, options.ComputeDType, [maxLength, config.KeyValueDim]));
        }
        return list;
    }

    /// <summary>
    /// A KV cache's forward workspace for <paramref name="tokens"/> tokens and <paramref name="logitRows"/> rows of
    /// logits: ids and positions; x0, x1, normed, h [n, C]; rstd [n]; q and attention out [n, Hq·D]; gate, up, silu·up
    /// [n, I]; the logits [rows, V] (rstd and logits fp32 with BF16 compute); with adapters xa [n · r] and with BF16
    /// compute the bf16 working copies of A [r · max in] and B [max out · r].
    /// </summary>
    public static IReadOnlyList<TensorSpec> CacheWorkspace(LlamaConfig config, ModelLayoutOptions options, int tokens, int logitRows)
    {
        Check(config, options);
        long n = tokens, C = config.HiddenSize, QD = config.QueryDim, I = config.IntermediateSize;
        DType d = options.ComputeDType, s = options.StatisticsDType;
        var list = new List<TensorSpec>();
        void Add(string name, DType dtype, params long[] shape) =>
            list.Add(new TensorSpec("cache." + name, TensorCategory.CacheWorkspace, MemoryRegion.Transient, dtype, shape));
        foreach (string ids in new[] { "input_ids", "position_ids" }) Add(ids, DType.I32, n);
        foreach (string hidden in new[] { "x0", "x1", "normed" }) Add(hidden, d, n, C);
        Add("rstd", s, n);
        foreach (string attention in new[] { "q", "attention" }) Add(attention, d, n, QD);
        Add("h", d, n, C);
        foreach (string mlp in MlpNames) Add(mlp, d, n, I);
        // With BF16 compute the lm_head GEMM writes fp32 logits directly (bf16 inputs, fp32 accumulate and output).
        Add("logits", s, logitRows, config.VocabSize);
        if (Lora(config, options) is { } lora)
        {
            Add("lora.xa", d, n * options.LoraRank);
            if (options.AdapterDType != d)
            {
                Add("lora.a_work", d, options.LoraRank * lora.MaxIn);
                Add("lora.b_work", d, lora.MaxOut * options.LoraRank);
            }
        }
        return list;
    }

    private static void Check(LlamaConfig config, ModelLayoutOptions options)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(options);
    }

    /// <summary>Σ bytes of <paramref name="specs"/> (of one category, or all), each rounded up to <paramref name="alignment"/>.</summary>
    public static long SumBytes(this IEnumerable<TensorSpec> specs, TensorCategory? category = null, int alignment = 1)
    {
        ArgumentNullException.ThrowIfNull(specs);
        long sum = 0;
        foreach (var t in specs)
            if (category is null || t.Category == category) sum = checked(sum + t.Bytes(alignment));
        return sum;
    }

    /// <summary>The seven projections of a block: short name, module path and [out, in].</summary>
    public static IReadOnlyList<(string Short, string Path, long Out, long In)> Projections(LlamaConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        var shapes = config.LayerTensors(0).Where(t => t.Shape.Length == 2).ToList();
        return LlamaDecoderLayer.Projections
            .Select(p =>
            {
                var shape = shapes.First(t => t.Name.EndsWith(p.Path + ".weight", StringComparison.Ordinal)).Shape;
                return (p.Short, p.Path, (long)shape[0], (long)shape[1]);
            })
            .ToList();
    }

    /// <summary>The adapters' shared sizes: the largest Σ r of a group (<see cref="LlamaModel.LoraGroups"/>), the widest input and output of a target; null without adapters.</summary>
    private static (long GroupRank, long MaxIn, long MaxOut)? Lora(LlamaConfig config, ModelLayoutOptions o)
    {
        if (!o.HasLora) return null;
        var targeted = Projections(config).Where(p => o.LoraTargets.Contains(p.Short)).ToList();
        if (targeted.Count == 0) return null;
        long groupRank = LlamaModel.LoraGroups.Max(g => (long)g.Count(o.LoraTargets.Contains) * o.LoraRank);
        return (groupRank, targeted.Max(p => p.In), targeted.Max(p => p.Out));
    }
}
