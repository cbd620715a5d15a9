using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Ops.Reference;
using NativePeft.Quantization;
using NativePeft.Runtime;

namespace NativePeft.Modules;

/// <summary>One decoder block's parameters (HF names under model.layers.{Index}).</summary>
public sealed class LlamaDecoderLayer
{
    /// <summary>Module paths of the seven projections inside a block, by their short (target) name.</summary>
    public static IReadOnlyList<(string Short, string Path)> Projections { get; } =
    [
        ("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"), ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"),
        ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"), ("down_proj", "mlp.down_proj"),
    ];

    public int Index { get; }
    public Tensor InputLayernorm { get; }
    public Tensor? InputLayernormGrad { get; }
    public Tensor PostAttentionLayernorm { get; }
    public Tensor? PostAttentionLayernormGrad { get; }
    public ILinearLayer QProj => _proj[0];
    public ILinearLayer KProj => _proj[1];
    public ILinearLayer VProj => _proj[2];
    public ILinearLayer OProj => _proj[3];
    public ILinearLayer GateProj => _proj[4];
    public ILinearLayer UpProj => _proj[5];
    public ILinearLayer DownProj => _proj[6];

    private readonly ILinearLayer[] _proj;

    internal LlamaDecoderLayer(int index, Tensor inputLayernorm, Tensor? inputLayernormGrad, Tensor postAttentionLayernorm,
        Tensor? postAttentionLayernormGrad, ILinearLayer[] projections)
    {
        Index = index;
        InputLayernorm = inputLayernorm;
        InputLayernormGrad = inputLayernormGrad;
        PostAttentionLayernorm = postAttentionLayernorm;
        PostAttentionLayernormGrad = postAttentionLayernormGrad;
        _proj = projections;
    }

    /// <summary>A projection by its short name (q_proj … down_proj).</summary>
    public ILinearLayer this[string shortName]
    {
        get
        {
            for (int i = 0; i < Projections.Count; i++)
                if (Projections[i].Short == shortName) return _proj[i];
            throw new ArgumentException($"unknown projection \"{shortName}\"", nameof(shortName));
        }
    }
}

/// <summary>
/// A Llama-architecture causal language model over an <see cref="IOps"/>, with an explicit forward and backward
/// (no autograd). Layout and names are Hugging Face's (LlamaForCausalLM): embed_tokens; per block input_layernorm,
/// q/k/v/o_proj, RoPE (rotate_half, HF inv_freq incl. llama3 rope_scaling), causal grouped-query attention, residual,
/// post_attention_layernorm, gate/up/down_proj with SwiGLU, residual; final norm; lm_head (or the tied embedding);
/// the loss is the fused, vocabulary-chunked cross-entropy.
/// <para>
/// Labels follow HF's convention: <c>labels</c> has the shape of <c>input_ids</c> (usually equal to it) and the model
/// shifts it: position t is trained to predict <c>labels[b, t+1]</c>; the last position of each row and labels of
/// -100 contribute nothing. The loss is the mean over the counted positions.
/// </para>
/// <para>
/// Packed rows (<see cref="Forward(ReadOnlySpan{int}, ReadOnlySpan{int}, int, int, ReadOnlySpan{int})"/> with
/// positions): a row holds several documents back to back; each token's position restarts at 0 at its document's
/// start (RoPE uses it), attention never crosses a document boundary, and the last token of a document predicts
/// nothing (its target, the next document's first label, is ignored). Each document then gets the logits, loss terms
/// and gradients it gets alone in a row of its own.
/// </para>
/// <para>
/// Memory: parameters, gradients and the 4-bit dequantization scratch live in one arena; activations for the current
/// batch shape in another (reallocated when the shape changes). Without <see cref="LlamaModelOptions.Recompute"/> each
/// block keeps its activations from the forward to the backward; with it only the block inputs [N, hidden] are kept and
/// one block's activations are recomputed inside its backward.
/// </para>
/// </summary>
public sealed partial class LlamaModel : IDisposable
{
    private readonly IOps _ops;
    private readonly TensorArena _params;
    /// <summary>The persistent tensors of <see cref="ModelLayout.Parameters"/> by name: what <see cref="Populate"/> allocates.</summary>
    private readonly Dictionary<string, TensorSpec> _parameterSpecs;
    private readonly List<(string Name, Tensor Param, Tensor Grad)> _trainable = [];
    private readonly List<LoraLinear> _lora = [];
    /// <summary>Mixed-precision full fine-tuning: each fp32 master weight (trained) and its bf16 working copy (computed with).</summary>
    private readonly List<(Tensor Master, Tensor Working)> _workingCopies = [];
    private readonly LoraScratch _loraScratch = new();
    private readonly LlamaDecoderLayer[] _layers;
    /// <summary>"layer 0", "layer 1", …: the NVTX range names of the blocks (made once).</summary>
    private readonly string[] _layerNames;
    private Activations? _acts;
    private TensorArena? _ropeArena;
    private Tensor? _ropeCos, _ropeSin;
    private int _ropeRows;
    private bool _forwardDone;

    public LlamaConfig Config { get; }
    public LlamaModelOptions Options { get; }
    /// <summary>The inputs of this model's <see cref="ModelLayout"/> (its options, with a 4-bit checkpoint's stored quantization).</summary>
    public ModelLayoutOptions LayoutOptions { get; }
    public IOps Ops => _ops;
    public DType ComputeDType => Options.ComputeDType;
    /// <summary>
    /// The dtype of the per-row statistics (RMSNorm rstd, attention and loss lse) and the RoPE tables: F32 with BF16
    /// compute (the GPU ops keep them in fp32), the compute dtype otherwise.
    /// </summary>
    public DType StatisticsDType => ComputeDType == DType.BF16 ? DType.F32 : ComputeDType;
    /// <summary>The dtype of LoRA A and B, their gradients (and so the optimizer): F32 with BF16 compute (PEFT keeps
    /// adapters in fp32), the compute dtype otherwise. Also the dtype of the master weights and gradients of full
    /// fine-tuning.</summary>
    public DType AdapterDType => ComputeDType == DType.BF16 ? DType.F32 : ComputeDType;

    /// <summary>
    /// Mixed-precision full fine-tuning (BF16 compute): rounds every fp32 master weight (what the optimizer updates, in
    /// <see cref="TrainableParameters"/>) into the bf16 working copy the forward and backward use. Call it after each
    /// optimizer step and after writing the trainable parameters (the <see cref="Training.Trainer"/> does). A no-op
    /// otherwise.
    /// </summary>
    public void RefreshWorkingWeights()
    {
        foreach (var (master, working) in _workingCopies) _ops.Copy(master, working);
    }
    private Tensor? _embedTokens;
    /// <summary>embed_tokens.weight [V, C] on the device (not with <see cref="LlamaModelOptions.EmbeddingOnHost"/>: see
    /// <see cref="HostEmbedding"/>).</summary>
    public Tensor EmbedTokens => _embedTokens
        ?? throw new InvalidOperationException("the embedding table is kept in host memory (EmbeddingOnHost): see HostEmbedding");
    /// <summary>The embedding table in host memory with <see cref="LlamaModelOptions.EmbeddingOnHost"/>, else null.</summary>
    public HostEmbeddingTable? HostEmbedding { get; private set; }
    public Tensor? EmbedTokensGrad { get; private set; }
    public Tensor Norm { get; private set; } = null!;
    public Tensor? NormGrad { get; private set; }
    /// <summary>lm_head.weight [V, C]; the embedding table itself when tie_word_embeddings.</summary>
    public Tensor LmHead { get; private set; } = null!;
    public Tensor? LmHeadGrad { get; private set; }
    public IReadOnlyList<LlamaDecoderLayer> Layers => _layers;
    public IReadOnlyList<LoraLinear> LoraLayers => _lora;
    /// <summary>
    /// The projections of a block that read the same input and run their adapters together
    /// (<see cref="LoraLinear.ForwardGroup"/>): q, k, v (the normed hidden); o; gate, up (the normed residual); down.
    /// </summary>
    public static IReadOnlyList<string[]> LoraGroups { get; } = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]];
    /// <summary>The largest Σ r of the adapters of one group (<see cref="LoraGroups"/>) in any block: the LoRA scratch's width.</summary>
    public int LoraGroupRank => _layers.Max(layer => LoraGroups.Max(group => group.Sum(name => layer[name] is LoraLinear l ? l.Rank : 0)));
    /// <summary>Dropout on/off (training) and the step the masks are drawn for.</summary>
    public DropoutContext Dropout { get; } = new();
    /// <summary>The 4-bit layers' shared dequantization buffer; null when no layer is 4-bit.</summary>
    public DequantScratch? DequantScratch { get; private set; }

    /// <summary>
    /// Trainable parameters with their gradients: LoRA A and B under PEFT's names
    /// (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight), or with full fine-tuning every base tensor
    /// under its HF name (model.embed_tokens.weight, …, lm_head.weight unless tied).
    /// </summary>
    public IReadOnlyList<(string Name, Tensor Param, Tensor Grad)> TrainableParameters => _trainable;

    /// <summary>Counted (non-ignored) target positions of the last <see cref="Forward(Tensor, Tensor)"/>.</summary>
    public int LastTokenCount { get; private set; }

    /// <summary>Bytes of parameters, gradients and the dequantization scratch.</summary>
    public long ParameterBytes => _params.Bytes;
    /// <summary>Bytes of the activations and workspace held for the current batch shape.</summary>
    public long ActivationBytes => _acts?.Arena.Bytes ?? 0;

    private LlamaModel(LlamaConfig config, IOps ops, LlamaModelOptions options, ModelLayoutOptions layout, TensorArena arena)
    {
        Config = config;
        _ops = ops;
        Options = options;
        LayoutOptions = layout;
        _parameterSpecs = ModelLayout.Parameters(config, layout).ToDictionary(t => t.Name);
        _params = arena;
        _layers = new LlamaDecoderLayer[config.NumHiddenLayers];
        _layerNames = Enumerable.Range(0, config.NumHiddenLayers).Select(l => $"layer {l}").ToArray();
        Dropout.Seed = (ulong)(uint)options.Seed;
    }

    // ------------------------------------------------------------------------------------------ construction

    /// <summary>
    /// Loads a HF Llama checkpoint (validated first: a missing tensor or a shape that disagrees with config.json is an
    /// <see cref="HfCheckpointException"/> naming the tensor, and nothing is allocated). Linear weights stored as
    /// bitsandbytes 4-bit are loaded as they are; others are quantized on load when options ask for it. On any error
    /// every tensor allocated so far is freed.
    /// </summary>
    public static LlamaModel Load(HfCheckpoint checkpoint, IOps ops, LlamaModelOptions options)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        checkpoint.Validate();
        return Build(checkpoint.Config, ops, options, new CheckpointSource(checkpoint));
    }

    /// <summary>
    /// A model with random weights (for tests and benchmarks): every linear and embedding weight Normal(0, std²),
    /// every norm weight 1 + Normal(0, std²), drawn from a generator seeded by (weightSeed, tensor name).
    /// </summary>
    public static LlamaModel CreateRandom(LlamaConfig config, IOps ops, LlamaModelOptions options, int weightSeed = 1, double std = 0.02)
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        return Build(config, ops, options, new RandomSource(weightSeed, std));
    }

    /// <summary>Elements of the tile <see cref="CreateRandomTiled"/> repeats: 2^20, a whole number of 256 blocks of any
    /// blocksize up to 4096 (so the quantized tile's absmax and nested absmax repeat with it).</summary>
    public const int RandomTileElements = 1 << 20;

    /// <summary>
    /// A model with random weights made on the ops' device, for benchmarks of real shapes: every linear and embedding
    /// weight repeats one tile of <see cref="RandomTileElements"/> Normal(0, std²) values drawn on the host from
    /// <paramref name="weightSeed"/> (uploaded once per tensor, then doubled by device-to-device copies inside it), so no
    /// host array larger than the tile exists whatever the model's size. A 4-bit weight repeats the tile's quantized
    /// bytes and absmax (double-quantized: codes and nested absmax; the offset is the tile's) the same way, in the
    /// tensors and sizes quantizing on load gives. Norm weights are 1 + Normal(0, std²) as in <see cref="CreateRandom"/>.
    /// The values repeat every tile, which a speed or memory benchmark does not see; tests of values use
    /// <see cref="CreateRandom"/>.
    /// </summary>
    public static LlamaModel CreateRandomTiled(LlamaConfig config, IOps ops, LlamaModelOptions options, int weightSeed = 1, double std = 0.02)
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        return Build(config, ops, options, new TiledRandomSource(weightSeed, std));
    }

    private static LlamaModel Build(LlamaConfig config, IOps ops, LlamaModelOptions options, IWeightSource source)
    {
        ArgumentNullException.ThrowIfNull(ops);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        if (options.ComputeDType == DType.BF16 && ops is CpuOps)
            throw new ArgumentException("ComputeDType: BF16 (mixed precision) runs on the GPU ops (CUDA or the emulator); the CPU reference computes in F32 or F64",
                nameof(LlamaModelOptions.ComputeDType));
        if (options.Lora?.RankProblem(config) is { } problem)
            throw new ArgumentOutOfRangeException(nameof(LoraSettings.Rank), options.Lora.Rank, problem);
        var layout = ModelLayoutOptions.For(options, source.StoredQuantization());
        var arena = new TensorArena(ops.Memory);
        try
        {
            var model = new LlamaModel(config, ops, options, layout, arena);
            model.Populate(source);
            return model;
        }
        catch
        {
            arena.Dispose();
            throw;
        }
    }

    private void Populate(IWeightSource source)
    {
        var dtype = ComputeDType;
        bool full = Options.FullFineTuning;
        int C = Config.HiddenSize;

        (Tensor Param, Tensor? Grad) Dense(string name, params int[] shape)
        {
            if (full && AdapterDType != dtype)
            {
                // Mixed precision: the optimizer trains an fp32 master weight with an fp32 gradient; the model computes
                // with its bf16 working copy (RefreshWorkingWeights after each step).
                var master = Parameter(name);
                WriteValues(source, name, shape, master);
                var working = Parameter(name + ".working");
                _ops.Copy(master, working);
                var grad = Parameter(name + ".grad");
                _trainable.Add((name, master, grad));
                _workingCopies.Add((master, working));
                return (working, grad);
            }
            var p = Parameter(name);
            WriteValues(source, name, shape, p);
            Tensor? g = null;
            if (full)
            {
                g = Parameter(name + ".grad");
                _trainable.Add((name, p, g));
            }
            return (p, g);
        }

        if (Options.EmbeddingOnHost)
        {
            if (Config.TieWordEmbeddings)
                throw new ArgumentException("EmbeddingOnHost: this model ties lm_head to the embedding table (tie_word_embeddings), " +
                                            "which the device needs for the loss: keep the embedding on the device", nameof(LlamaModelOptions.EmbeddingOnHost));
            HostEmbedding = new HostEmbeddingTable(source.Read("model.embed_tokens.weight", [Config.VocabSize, C]), Config.VocabSize, C, dtype);
        }
        else
        {
            var embed = Dense("model.embed_tokens.weight", Config.VocabSize, C);
            _embedTokens = embed.Param;
            EmbedTokensGrad = embed.Grad;
        }

        DequantScratch Scratch() => DequantScratch ??= new DequantScratch(Parameter(ModelLayout.DequantScratchName));
        int loraIndex = 0;
        for (int l = 0; l < Config.NumHiddenLayers; l++)
        {
            string prefix = $"model.layers.{l}.";
            var inNorm = Dense(prefix + "input_layernorm.weight", C);
            var projections = new ILinearLayer[LlamaDecoderLayer.Projections.Count];
            var shapes = Config.LayerTensors(l).ToDictionary(t => t.Name, t => t.Shape);
            for (int p = 0; p < projections.Length; p++)
            {
                var (shortName, path) = LlamaDecoderLayer.Projections[p];
                string name = prefix + path + ".weight";
                int outF = (int)shapes[name][0], inF = (int)shapes[name][1];
                ILinearLayer layer;
                if (LayoutOptions.FourBit)
                {
                    layer = new Linear4bit(_ops, UploadQuantized(name, source, outF, inF), Scratch());
                }
                else if (LayoutOptions.Widened)
                {
                    // A frozen base stored narrower than the compute dtype (BF16): rounded once, widened per GEMM.
                    var w = Parameter(name);
                    var wide = Scratch().View(outF, inF); // the widening scratch doubles as the upload buffer: no temporary
                    if (source is TiledRandomSource tiled) tiled.Write(_ops, w);
                    else
                    {
                        UploadValues(source.Read(name, [outF, inF]), wide);
                        _ops.Copy(wide, w);
                    }
                    layer = new Linear(_ops, w, null, Scratch());
                }
                else
                {
                    var (w, g) = Dense(name, outF, inF);
                    layer = new Linear(_ops, w, g);
                }
                if (Options.Lora is { } lora && lora.TargetModules.Contains(shortName))
                {
                    string peft = "base_model.model." + prefix + path;
                    var a = Parameter(peft + ".lora_A.weight");
                    var b = Parameter(peft + ".lora_B.weight");
                    var ga = Parameter(peft + ".lora_A.weight.grad");
                    var gb = Parameter(peft + ".lora_B.weight.grad");
                    int index = loraIndex++;
                    var lin = new LoraLinear(_ops, layer, a, b, ga, gb, lora.Scaling, lora.Dropout, index, _loraScratch, Dropout);
                    lin.Initialize(new Random(DeriveSeed(Options.Seed, index)));
                    _trainable.Add((peft + ".lora_A.weight", a, ga));
                    _trainable.Add((peft + ".lora_B.weight", b, gb));
                    _lora.Add(lin);
                    layer = lin;
                }
                projections[p] = layer;
            }
            var postNorm = Dense(prefix + "post_attention_layernorm.weight", C);
            _layers[l] = new LlamaDecoderLayer(l, inNorm.Param, inNorm.Grad, postNorm.Param, postNorm.Grad, projections);
        }

        var norm = Dense("model.norm.weight", C);
        Norm = norm.Param;
        NormGrad = norm.Grad;
        if (Config.TieWordEmbeddings)
        {
            LmHead = _embedTokens!;
            LmHeadGrad = EmbedTokensGrad;
        }
        else
        {
            var head = Dense("lm_head.weight", Config.VocabSize, C);
            LmHead = head.Param;
            LmHeadGrad = head.Grad;
        }
    }

    /// <summary>The persistent tensor <paramref name="name"/> of the layout (<see cref="ModelLayout.Parameters"/>), allocated.</summary>
    private Tensor Parameter(string name) => _params.Allocate(ParameterSpec(name));

    private TensorSpec ParameterSpec(string name) => _parameterSpecs.TryGetValue(name, out var spec) ? spec
        : throw new InvalidOperationException($"the model layout lists no tensor \"{name}\" for these options");

    /// <summary>
    /// The layout's tensor <paramref name="specName"/> of a 4-bit weight, checked against what the checkpoint holds
    /// (<paramref name="dtype"/>, <paramref name="count"/> elements): a blocksize or double quantization other than
    /// the layout's is an <see cref="HfCheckpointException"/> naming the tensor.
    /// </summary>
    private Tensor QuantizedPart(string weightName, string specName, DType dtype, long count)
    {
        var spec = ParameterSpec(specName);
        if (spec.DType != dtype || spec.Count != count)
            throw new HfCheckpointException(weightName,
                $"{specName}: the 4-bit weight holds {dtype} [{count}], the model's layout expects {spec.DType} [{spec.Count}] " +
                $"(blocksize {LayoutOptions.Blocksize}, double quantization {(LayoutOptions.DoubleQuant ? "on" : "off")}): " +
                "every 4-bit weight of a checkpoint must be stored alike");
        return _params.Allocate(spec);
    }

    /// <summary>The specs of every tensor the model holds now (parameters, activations, RoPE tables), in allocation order (tests compare them with <see cref="ModelLayout"/>).</summary>
    internal IReadOnlyList<TensorSpec> AllocatedTensors =>
        [.. _params.Allocated, .. _ropeArena?.Allocated ?? [], .. _acts?.Arena.Allocated ?? []];

    /// <summary>A per-layer seed for LoRA A's generator: a hash of (seed, layer index).</summary>
    private static int DeriveSeed(int seed, int index) =>
        (int)(SeedHash.SplitMix64(SeedHash.SplitMix64((ulong)(uint)seed) ^ (ulong)index) & 0x7FFFFFFF);

    /// <summary>A dense tensor's values from the source: uploaded, or (the tiled random source, norms aside) made on the device.</summary>
    private void WriteValues(IWeightSource source, string name, int[] shape, Tensor t)
    {
        if (source is TiledRandomSource tiled && !name.EndsWith("norm.weight", StringComparison.Ordinal)) tiled.Write(_ops, t);
        else UploadValues(source.Read(name, shape), t);
    }

    private void UploadValues(float[] values, Tensor t)
    {
        if (t.DType == DType.F32) _ops.Upload<float>(values, t);
        else if (t.DType == DType.BF16)
        {
            var rounded = new BFloat16[values.Length];
            BFloat16.FromSingle(values, rounded);
            _ops.Upload<BFloat16>(rounded, t);
        }
        else _ops.Upload<double>(Array.ConvertAll(values, v => (double)v), t);
    }

    private QuantizedWeight UploadQuantized(string name, IWeightSource source, int rows, int columns)
    {
        if (source is TiledRandomSource tiled) return TiledQuantized(tiled, name, rows, columns);
        Quantized4BitTensor q;
        if (source.IsQuantized(name)) q = source.LoadQuantized(name);
        else
        {
            var values = source.Read(name, [rows, columns]);
            var quantType = Options.Quantization == BaseQuantization.Fp4 ? QuantType.Fp4 : QuantType.Nf4;
            q = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(values), [rows, columns], quantType, Options.Blocksize,
                Options.DoubleQuant, source.StoredDType(name));
        }
        var shape = q.State.Shape;
        if (shape.Length != 2 || shape[0] != rows || shape[1] != columns)
            throw new HfCheckpointException(name, $"{name}: 4-bit weight of shape [{string.Join(", ", shape)}], expected [{rows}, {columns}]");
        var packed = QuantizedPart(name, name, DType.U8, q.Packed.Length);
        _ops.Upload<byte>(q.Packed, packed);
        return new QuantizedWeight
        {
            Packed = packed, QuantType = q.State.QuantType, Blocksize = q.State.Blocksize, Rows = rows, Columns = columns,
            Absmax = q.State.Nested is { NestedBlockSize: DoubleQuantAbsmax.NestedBlocksize } ? null : Upload(q.State.GetAbsmax(), ".absmax", DType.F32),
            // bitsandbytes' double-quantized absmax stays as stored (the kernels decode it per block).
            DoubleQuant = q.State.Nested is { NestedBlockSize: DoubleQuantAbsmax.NestedBlocksize } dq
                ? new DoubleQuantAbsmax
                {
                    Absmax = Upload<byte>(dq.QuantizedAbsmax, ".absmax", DType.U8), NestedAbsmax = Upload(dq.NestedAbsmax, ".nested_absmax", DType.F32),
                    NestedQuantMap = Upload(dq.NestedQuantMap, ".nested_quant_map", DType.F32), NestedOffset = Upload([dq.Offset], ".nested_offset", DType.F32),
                }
                : null,
        };

        Tensor Upload<T>(T[] values, string suffix, DType dtype) where T : unmanaged
        {
            var t = QuantizedPart(name, name + suffix, dtype, values.Length);
            _ops.Upload<T>(values, t);
            return t;
        }
    }

    /// <summary>A [rows, columns] 4-bit weight repeating the tiled source's quantized tile: the tensors quantizing on load allocates.</summary>
    private QuantizedWeight TiledQuantized(TiledRandomSource tiled, string name, int rows, int columns)
    {
        var quantType = Options.Quantization == BaseQuantization.Fp4 ? QuantType.Fp4 : QuantType.Nf4;
        int blocksize = Options.Blocksize;
        var q = tiled.QuantizedTile(quantType, blocksize, Options.DoubleQuant);
        // Each tensor as the layout sizes it (the tile's quantization repeated over it).
        Tensor Repeated<T>(T[] tile, string specName) where T : unmanaged
        {
            var t = Parameter(specName);
            TiledRandomSource.Repeat(_ops, tile, t);
            return t;
        }
        var packed = Repeated(q.Packed, name);
        var nested = q.State.Nested is { NestedBlockSize: DoubleQuantAbsmax.NestedBlocksize } dq ? dq : null;
        return new QuantizedWeight
        {
            Packed = packed, QuantType = quantType, Blocksize = blocksize, Rows = rows, Columns = columns,
            Absmax = nested is null ? Repeated(q.State.GetAbsmax(), name + ".absmax") : null,
            DoubleQuant = nested is null ? null : new DoubleQuantAbsmax
            {
                Absmax = Repeated(nested.QuantizedAbsmax, name + ".absmax"),
                NestedAbsmax = Repeated(nested.NestedAbsmax, name + ".nested_absmax"),
                NestedQuantMap = Repeated(nested.NestedQuantMap, name + ".nested_quant_map"),
                NestedOffset = Repeated([nested.Offset], name + ".nested_offset"),
            },
        };
    }

    private interface IWeightSource
    {
        bool AnyQuantized { get; }
        bool IsQuantized(string name);
        Quantized4BitTensor LoadQuantized(string name);
        float[] Read(string name, int[] shape);
        DType StoredDType(string name);
        /// <summary>The blocksize and double quantization (kept as stored) of a bitsandbytes checkpoint's 4-bit weights, or null.</summary>
        (int Blocksize, bool DoubleQuant)? StoredQuantization();
    }

    private sealed class CheckpointSource(HfCheckpoint ckpt) : IWeightSource
    {
        public bool AnyQuantized => ckpt.IsQuantizedCheckpoint;
        public bool IsQuantized(string name) => ckpt.IsQuantized(name);
        public Quantized4BitTensor LoadQuantized(string name) => ckpt.LoadQuantized(name);
        public float[] Read(string name, int[] shape) => ckpt.ReadArray<float>(name);
        public DType StoredDType(string name) => ckpt.GetInfo(name).DType;

        public (int Blocksize, bool DoubleQuant)? StoredQuantization()
        {
            if (!ckpt.IsQuantizedCheckpoint || ckpt.TensorNames.FirstOrDefault(ckpt.IsQuantized) is not { } name) return null;
            var state = ckpt.LoadQuantized(name).State;
            return (state.Blocksize, state.Nested is { NestedBlockSize: DoubleQuantAbsmax.NestedBlocksize });
        }
    }

    private sealed class RandomSource(int seed, double std) : IWeightSource
    {
        public bool AnyQuantized => false;
        public bool IsQuantized(string name) => false;
        public Quantized4BitTensor LoadQuantized(string name) => throw new InvalidOperationException();
        public DType StoredDType(string name) => DType.F32;
        public (int Blocksize, bool DoubleQuant)? StoredQuantization() => null;

        public float[] Read(string name, int[] shape)
        {
            long n = 1;
            foreach (var d in shape) n *= d;
            ulong h = SeedHash.SplitMix64((ulong)(uint)seed);
            foreach (char c in name) h = SeedHash.SplitMix64(h ^ c);
            var rng = new Random((int)(h & 0x7FFFFFFF));
            bool norm = name.EndsWith("norm.weight", StringComparison.Ordinal);
            var v = new float[n];
            for (long i = 0; i < n; i++)
            {
                double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
                double z = Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2);
                v[i] = (float)((norm ? 1 : 0) + std * z);
            }
            return v;
        }
    }

    /// <summary>
    /// <see cref="CreateRandomTiled"/>'s weights: one host tile of Normal(0, std²) values (and its 4-bit quantization
    /// per format) repeated over each tensor on the device; norm weights per name as <see cref="RandomSource"/>.
    /// </summary>
    private sealed class TiledRandomSource(int seed, double std) : IWeightSource
    {
        /// <summary>The largest single copy while repeating (elements): keeps each copy's bytes within an int on the CPU.</summary>
        private const long MaxCopyElements = 1L << 26;
        private readonly RandomSource _names = new(seed, std);
        private float[]? _tile;
        private BFloat16[]? _tileBf16;
        private readonly Dictionary<(QuantType, int, bool), Quantized4BitTensor> _quantized = [];

        public bool AnyQuantized => false;
        public bool IsQuantized(string name) => false;
        public Quantized4BitTensor LoadQuantized(string name) => throw new InvalidOperationException();
        public DType StoredDType(string name) => DType.F32;
        public (int Blocksize, bool DoubleQuant)? StoredQuantization() => null;
        public float[] Read(string name, int[] shape) => _names.Read(name, shape);

        private float[] Tile => _tile ??= _names.Read("tile", [RandomTileElements]);

        /// <summary>The tile repeated over <paramref name="t"/> (F32, BF16 or F64).</summary>
        public void Write(IOps ops, Tensor t)
        {
            switch (t.DType)
            {
                case DType.F32: Repeat(ops, Tile, t); break;
                case DType.BF16:
                    if (_tileBf16 is null)
                    {
                        _tileBf16 = new BFloat16[RandomTileElements];
                        BFloat16.FromSingle(Tile, _tileBf16);
                    }
                    Repeat(ops, _tileBf16, t);
                    break;
                default: Repeat(ops, Array.ConvertAll(Tile, v => (double)v), t); break;
            }
        }

        public Quantized4BitTensor QuantizedTile(QuantType quantType, int blocksize, bool doubleQuant)
        {
            if (!_quantized.TryGetValue((quantType, blocksize, doubleQuant), out var q))
                _quantized[(quantType, blocksize, doubleQuant)] = q = Quantized4BitTensor.Quantize(new ReadOnlyMemory<float>(Tile),
                    [1, RandomTileElements], quantType, blocksize, doubleQuant, DType.F32);
            return q;
        }

        /// <summary>
        /// <paramref name="t"/> = <paramref name="tile"/> repeated (element i is tile[i mod tile length]): the first
        /// min(count, tile) elements uploaded, then the filled prefix copied after itself, doubling, within the tensor.
        /// </summary>
        public static void Repeat<T>(IOps ops, T[] tile, Tensor t) where T : unmanaged
        {
            long n = t.Count, period = tile.Length;
            long filled = Math.Min(n, period);
            ops.Upload<T>(tile.AsSpan(0, (int)filled), t.Slice(0, (int)filled));
            long maxCopy = Math.Max(1, MaxCopyElements / period) * period;
            while (filled < n)
            {
                int len = (int)Math.Min(Math.Min(filled, n - filled), maxCopy); // filled stays a whole number of periods
                ops.Copy(t.Slice(0, len), t.Slice(filled, len));
                filled += len;
            }
        }
    }

    // ------------------------------------------------------------------------------------------ parameters

    /// <summary>
    /// Every base tensor under its HF name: the dense tensor (compute dtype; the fp32 master weight with mixed-precision
    /// full fine-tuning) or, for a 4-bit linear weight, the quantized one. lm_head.weight is listed only when not tied.
    /// </summary>
    public IEnumerable<(string Name, Tensor? Dense, QuantizedWeight? Quantized)> BaseParameters()
    {
        foreach (var (name, dense, quantized) in BaseTensors())
            yield return (name, dense is null ? null : MasterOf(dense), quantized);
    }

    private Tensor MasterOf(Tensor t)
    {
        foreach (var (master, working) in _workingCopies)
            if (ReferenceEquals(working, t)) return master;
        return t;
    }

    private IEnumerable<(string Name, Tensor? Dense, QuantizedWeight? Quantized)> BaseTensors()
    {
        if (_embedTokens is not null) yield return ("model.embed_tokens.weight", _embedTokens, null);
        foreach (var layer in _layers)
        {
            string prefix = $"model.layers.{layer.Index}.";
            yield return (prefix + "input_layernorm.weight", layer.InputLayernorm, null);
            foreach (var (shortName, path) in LlamaDecoderLayer.Projections)
            {
                var lin = layer[shortName];
                if (lin is LoraLinear lora) lin = lora.Base;
                yield return lin switch
                {
                    Linear d => (prefix + path + ".weight", d.Weight, null),
                    Linear4bit q => (prefix + path + ".weight", null, q.Weight),
                    _ => throw new InvalidOperationException(lin.GetType().Name),
                };
            }
            yield return (prefix + "post_attention_layernorm.weight", layer.PostAttentionLayernorm, null);
        }
        yield return ("model.norm.weight", Norm, null);
        if (!Config.TieWordEmbeddings) yield return ("lm_head.weight", LmHead, null);
    }

    /// <summary>Zeroes every gradient.</summary>
    public void ZeroGrad()
    {
        var seen = new HashSet<ulong>();
        foreach (var (_, _, g) in _trainable)
            if (seen.Add(g.Data.Address)) _ops.Fill(g, 0);
    }

    /// <summary>Merges every LoRA layer into its (full-precision) base weight.</summary>
    public void MergeAdapters()
    {
        foreach (var l in _lora) l.Merge();
    }

    /// <summary>Undoes <see cref="MergeAdapters"/>.</summary>
    public void UnmergeAdapters()
    {
        foreach (var l in _lora) l.Unmerge();
    }

    /// <summary>HF position ids for a batch without padding: position t of every row is t; [batch · seqLen] row-major.</summary>
    public static int[] PositionIds(int batch, int seqLen)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(batch);
        ArgumentOutOfRangeException.ThrowIfNegative(seqLen);
        var p = new int[checked(batch * seqLen)];
        for (int b = 0; b < batch; b++)
            for (int t = 0; t < seqLen; t++) p[b * seqLen + t] = t;
        return p;
    }

    /// <summary>
    /// <see cref="ShiftLabels(ReadOnlySpan{int}, int, int)"/> for packed rows: also -100 at every t whose next token
    /// starts a new document (positions[b, t+1] = 0), so that no document predicts another's first token.
    /// </summary>
    public static int[] ShiftLabels(ReadOnlySpan<int> labels, int batch, int seqLen, ReadOnlySpan<int> positions)
    {
        var shifted = ShiftLabels(labels, batch, seqLen);
        if (positions.IsEmpty) return shifted;
        if (positions.Length != shifted.Length)
            throw new ArgumentException($"positions has {positions.Length} elements, expected {batch}·{seqLen}", nameof(positions));
        for (int b = 0; b < batch; b++)
            for (int t = 0; t + 1 < seqLen; t++)
                if (positions[b * seqLen + t + 1] == 0) shifted[b * seqLen + t] = CrossEntropyRef.IgnoreIndex;
        return shifted;
    }

    /// <summary>
    /// HF's shift: target[b, t] = labels[b, t+1] for t &lt; T−1 and -100 (ignored) at t = T−1; [batch · seqLen].
    /// </summary>
    public static int[] ShiftLabels(ReadOnlySpan<int> labels, int batch, int seqLen)
    {
        if (labels.Length != (long)batch * seqLen)
            throw new ArgumentException($"labels has {labels.Length} elements, expected {batch}·{seqLen}", nameof(labels));
        var shifted = new int[labels.Length];
        for (int b = 0; b < batch; b++)
        {
            for (int t = 0; t + 1 < seqLen; t++) shifted[b * seqLen + t] = labels[b * seqLen + t + 1];
            if (seqLen > 0) shifted[b * seqLen + seqLen - 1] = CrossEntropyRef.IgnoreIndex;
        }
        return shifted;
    }

    // ------------------------------------------------------------------------------------------ forward / backward

    /// <summary>
    /// Forward over input_ids I32 [B, T] with labels I32 [B, T] in HF's convention (unshifted; the model shifts, -100
    /// ignored). Returns the mean cross-entropy over the counted positions (0 when none; see <see cref="LastTokenCount"/>)
    /// and keeps what <see cref="Backward"/> needs.
    /// </summary>
    public double Forward(Tensor inputIds, Tensor labels)
    {
        ArgumentNullException.ThrowIfNull(inputIds);
        ArgumentNullException.ThrowIfNull(labels);
        if (inputIds.DType != DType.I32 || inputIds.Rank != 2)
            throw new ArgumentException($"inputIds: expected I32 [batch, seq], got {inputIds}", nameof(inputIds));
        if (labels.DType != DType.I32) throw new ArgumentException($"labels: expected I32, got {labels}", nameof(labels));
        labels.Expect(nameof(labels), inputIds[0], inputIds[1]);
        var ids = new int[inputIds.Count];
        var lab = new int[labels.Count];
        _ops.Download<int>(inputIds, ids);
        _ops.Download<int>(labels, lab);
        return Forward(ids, lab, inputIds[0], inputIds[1]);
    }

    /// <summary>As <see cref="Forward(Tensor, Tensor)"/> from host arrays [batch · seqLen].</summary>
    public double Forward(ReadOnlySpan<int> inputIds, ReadOnlySpan<int> labels, int batch, int seqLen) =>
        Forward(inputIds, labels, batch, seqLen, default);

    /// <summary>
    /// As <see cref="Forward(ReadOnlySpan{int}, ReadOnlySpan{int}, int, int)"/> over packed rows: <paramref name="positions"/>
    /// [batch · seqLen] is each token's position inside its document (0 at every document start, +1 per token; checked
    /// by <see cref="AttentionRef.ValidatePositions"/>), or empty for one sequence per row (positions 0..T−1). With
    /// positions, RoPE uses them, attention stays inside each document, and targets across a boundary are ignored
    /// (<see cref="ShiftLabels(ReadOnlySpan{int}, int, int, ReadOnlySpan{int})"/>); <see cref="Backward"/> and
    /// <see cref="Logits"/> follow the same batch.
    /// </summary>
    public double Forward(ReadOnlySpan<int> inputIds, ReadOnlySpan<int> labels, int batch, int seqLen, ReadOnlySpan<int> positions)
    {
        if (batch <= 0 || seqLen <= 0) throw new ArgumentOutOfRangeException(nameof(batch), $"batch {batch} and seqLen {seqLen} must be positive");
        if (inputIds.Length != (long)batch * seqLen)
            throw new ArgumentException($"inputIds has {inputIds.Length} elements, expected {batch}·{seqLen}", nameof(inputIds));
        bool packed = !positions.IsEmpty;
        if (packed) AttentionRef.ValidatePositions(positions, batch, seqLen);
        _forwardDone = false;
        var a = EnsureActivations(batch, seqLen);
        EnsureRope(seqLen);
        _ops.Upload(inputIds, a.Ids);
        _ops.Upload<int>(ShiftLabels(labels, batch, seqLen, positions), a.Labels);
        if (packed) _ops.Upload(positions, a.Positions);
        else if (a.Packed) _ops.Upload<int>(PositionIds(batch, seqLen), a.Positions);
        a.Packed = packed;

        using var range = Nvtx.Range("forward");
        using (Nvtx.Range("embedding")) Embed(inputIds, a.Ids, a.Hidden[0]);
        for (int l = 0; l < _layers.Length; l++)
            using (Nvtx.Range(_layerNames[l]))
                BlockForward(l, a.Hidden[l], a.Hidden[l + 1], a.BlockFor(l), a);
        double loss;
        int count;
        using (Nvtx.Range("final norm + lm_head + cross-entropy"))
        {
            _ops.RmsNormForward(a.Hidden[^1], Norm, a.NormOut, a.RstdF, Config.RmsNormEps);
            (loss, count) = _ops.CrossEntropyForward(a.NormOut, LmHead, a.Labels, a.CeLse, Options.CrossEntropyChunk);
        }
        LastTokenCount = count;
        _forwardDone = true;
        return loss;
    }

    /// <summary>
    /// Gradients of the last forward's mean loss, accumulated (+=) into the trainable parameters' gradients
    /// (call <see cref="ZeroGrad"/> between steps). Frozen parameters get none; 4-bit weights never.
    /// </summary>
    public void Backward()
    {
        if (!_forwardDone || _acts is null) throw new InvalidOperationException("Backward needs a Forward first");
        if (_trainable.Count == 0) throw new InvalidOperationException("the model has nothing trainable (no LoRA, no full fine-tuning)");
        var a = _acts;
        using var range = Nvtx.Range("backward");
        using (Nvtx.Range("final norm + lm_head + cross-entropy"))
        {
            _ops.CrossEntropyBackward(a.NormOut, LmHead, a.Labels, a.CeLse, 1.0, a.DN, LmHeadGrad, Options.CrossEntropyChunk);
            _ops.RmsNormBackward(a.DN, a.Hidden[^1], Norm, a.RstdF, a.DRes, NormGrad);
        }
        for (int l = _layers.Length - 1; l >= 0; l--)
        {
            using var layer = Nvtx.Range(_layerNames[l]);
            if (Options.Recompute)
                using (Nvtx.Range("recompute"))
                    BlockForward(l, a.Hidden[l], a.Hidden[l + 1], a.BlockFor(l), a);
            BlockBackward(l, a.Hidden[l], a.BlockFor(l), a);
            GradientsReady?.Invoke(l);
        }
        if (EmbedTokensGrad is not null)
            using (Nvtx.Range("embedding"))
                _ops.EmbeddingBackward(a.Ids, a.DRes, EmbedTokensGrad);
        GradientsReady?.Invoke(-1);
    }

    /// <summary>
    /// Called by <see cref="Backward"/> as gradients become final: with layer index l (from the last layer down to 0)
    /// once layer l's parameter gradients (its LoRA adapters, or its weights and norms with full fine-tuning) are
    /// written, and with -1 at the end, when the rest (embedding, final norm, lm_head) are. Data-parallel training
    /// starts reducing a layer's gradients there while the backward goes on (<see cref="Training.GradientReducer"/>).
    /// </summary>
    internal Action<int>? GradientsReady { get; set; }

    /// <summary>The last forward's logits [B·T, V] = final-norm output · lm_headᵀ into <paramref name="output"/> (tests, generation).</summary>
    public void Logits(Tensor output)
    {
        if (!_forwardDone || _acts is null) throw new InvalidOperationException("Logits needs a Forward first");
        output.Expect(nameof(output), _acts.N, Config.VocabSize);
        _ops.Matmul(_acts.NormOut, false, LmHead, true, output);
    }

    /// <summary>The rows of <paramref name="ids"/> (on the device as <paramref name="deviceIds"/>) into
    /// <paramref name="output"/>: the embedding kernel, or with the table in host memory a host gather and one upload.</summary>
    private void Embed(ReadOnlySpan<int> ids, Tensor deviceIds, Tensor output)
    {
        if (HostEmbedding is { } host) host.Gather(_ops, ids, output);
        else _ops.EmbeddingForward(deviceIds, EmbedTokens, output);
    }

    private void BlockForward(int l, Tensor x, Tensor output, BlockActivations s, Activations a)
    {
        var layer = _layers[l];
        int Hq = Config.NumAttentionHeads, Hkv = Config.NumKeyValueHeads, D = Config.HeadDim;
        var attention = Nvtx.Range("attention block");
        _ops.RmsNormForward(x, layer.InputLayernorm, s.N1, s.Rstd1, Config.RmsNormEps);
        LoraLinear.ForwardGroup([layer.QProj, layer.KProj, layer.VProj], s.N1, [s.Q, s.K, s.V]);
        _ops.RopeForward(s.Q, a.Positions, _ropeCos!, _ropeSin!, Hq, D);
        _ops.RopeForward(s.K, a.Positions, _ropeCos!, _ropeSin!, Hkv, D);
        using (Nvtx.Range("attention"))
            _ops.AttentionForward(s.Q, s.K, s.V, s.Att, s.Lse, a.B, a.T, Hq, Hkv, D, a.Packed ? a.Positions : null);
        layer.OProj.Forward(s.Att, s.H);
        _ops.Add(x, s.H, s.H);
        attention.Dispose();
        using var mlp = Nvtx.Range("mlp block");
        _ops.RmsNormForward(s.H, layer.PostAttentionLayernorm, s.N2, s.Rstd2, Config.RmsNormEps);
        LoraLinear.ForwardGroup([layer.GateProj, layer.UpProj], s.N2, [s.G, s.U]);
        _ops.SwiGluForward(s.G, s.U, s.A);
        layer.DownProj.Forward(s.A, output);
        _ops.Add(s.H, output, output);
    }

    /// <summary>In place on a.DRes: the gradient w.r.t. the block output in, w.r.t. the block input out.</summary>
    private void BlockBackward(int l, Tensor x, BlockActivations s, Activations a)
    {
        var layer = _layers[l];
        int Hq = Config.NumAttentionHeads, Hkv = Config.NumKeyValueHeads, D = Config.HeadDim;
        // MLP: out = h + down(silu(gate(n2)) · up(n2)), n2 = norm(h)
        var mlp = Nvtx.Range("mlp block");
        layer.DownProj.Backward(s.A, a.DRes, a.DA, false);
        _ops.SwiGluBackward(a.DA, s.G, s.U, a.DG, a.DU);
        LoraLinear.BackwardGroup([layer.GateProj, layer.UpProj], s.N2, [a.DG, a.DU], a.DN, false);
        _ops.RmsNormBackward(a.DN, s.H, layer.PostAttentionLayernorm, s.Rstd2, a.DRes, layer.PostAttentionLayernormGrad, accumulate: true);
        mlp.Dispose();
        // attention: h = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))), n1 = norm(x)
        using var attention = Nvtx.Range("attention block");
        layer.OProj.Backward(s.Att, a.DRes, a.DAtt, false);
        using (Nvtx.Range("attention"))
            _ops.AttentionBackward(a.DAtt, s.Q, s.K, s.V, s.Att, s.Lse, a.DQ, a.DK, a.DV, a.B, a.T, Hq, Hkv, D, a.Packed ? a.Positions : null);
        _ops.RopeBackward(a.DQ, a.Positions, _ropeCos!, _ropeSin!, Hq, D);
        _ops.RopeBackward(a.DK, a.Positions, _ropeCos!, _ropeSin!, Hkv, D);
        LoraLinear.BackwardGroup([layer.QProj, layer.KProj, layer.VProj], s.N1, [a.DQ, a.DK, a.DV], a.DN, false);
        _ops.RmsNormBackward(a.DN, x, layer.InputLayernorm, s.Rstd1, a.DRes, layer.InputLayernormGrad, accumulate: true);
    }

    // ------------------------------------------------------------------------------------------ buffers

    /// <summary>Computes the RoPE cos/sin tables (<paramref name="rows"/> × <paramref name="half"/>) in <typeparamref name="T"/> and uploads them.</summary>
    private void UploadRopeTables<T>(int rows, int half, RopeScaling? scaling, Tensor cos, Tensor sin)
        where T : unmanaged, System.Numerics.IFloatingPointIeee754<T>
    {
        var inv = RopeRef.InverseFrequencies<T>(Config.HeadDim, Config.RopeTheta, scaling);
        var c = new T[rows * half];
        var sn = new T[rows * half];
        RopeRef.Tables<T>(rows, inv, c, sn);
        _ops.Upload<T>(c, cos);
        _ops.Upload<T>(sn, sin);
    }

    private void EnsureRope(int seqLen)
    {
        if (_ropeCos is not null && _ropeRows >= seqLen) return;
        _ropeArena?.Dispose();
        _ropeCos = _ropeSin = null;
        int rows = ModelLayout.RopeRows(Config, seqLen);
        int half = Config.HeadDim / 2;
        var specs = ModelLayout.RopeTables(Config, LayoutOptions, seqLen);
        var scaling = Config.RopeScaling is { } s
            ? new RopeScaling(s.Factor, s.LowFreqFactor, s.HighFreqFactor, s.OriginalMaxPositionEmbeddings)
            : null;
        var arena = new TensorArena(_ops.Memory);
        try
        {
            var cos = arena.Allocate(specs.Single(t => t.Name == "rope.cos"));
            var sin = arena.Allocate(specs.Single(t => t.Name == "rope.sin"));
            if (StatisticsDType == DType.F64) UploadRopeTables<double>(rows, half, scaling, cos, sin);
            else UploadRopeTables<float>(rows, half, scaling, cos, sin);
            _ropeCos = cos;
            _ropeSin = sin;
            _ropeRows = rows;
            _ropeArena = arena;
        }
        catch
        {
            arena.Dispose();
            throw;
        }
    }

    /// <summary>Frees the activations of the current batch shape (the next forward allocates them again).</summary>
    public void ReleaseActivations()
    {
        _forwardDone = false;
        _acts?.Dispose();
        _acts = null;
        _loraScratch.Clear();
    }

    private Activations EnsureActivations(int batch, int seqLen)
    {
        if (_acts is { } a && a.B == batch && a.T == seqLen) return a;
        ReleaseActivations();
        var arena = new TensorArena(_ops.Memory);
        try
        {
            var specs = ModelLayout.Activations(Config, LayoutOptions, batch, seqLen).ToDictionary(t => t.Name);
            Tensor Allocate(string name) => arena.Allocate(specs[name]);
            _acts = new Activations(this, arena, Allocate, batch, seqLen);
            if (_lora.Count > 0)
            {
                // The LoRA scratch (LoraScratch): one group's xa and dxa; with mixed precision the bf16 working copies of A and B.
                _loraScratch.Xa = Allocate("lora.xa");
                _loraScratch.DXa = Allocate("lora.dxa");
                if (AdapterDType != ComputeDType)
                {
                    _loraScratch.AWork = Allocate("lora.a_work");
                    _loraScratch.BWork = Allocate("lora.b_work");
                }
            }
            return _acts;
        }
        catch
        {
            _acts = null;
            _loraScratch.Clear();
            arena.Dispose();
            throw;
        }
    }

    /// <summary>One block's saved tensors, "block.{i}.*" of <see cref="ModelLayout.Activations"/>.</summary>
    private sealed class BlockActivations(Func<string, Tensor> m, string p)
    {
        public readonly Tensor N1 = m(p + "n1"), Rstd1 = m(p + "rstd1");
        public readonly Tensor Q = m(p + "q"), K = m(p + "k"), V = m(p + "v");
        public readonly Tensor Att = m(p + "attention"), Lse = m(p + "lse");
        public readonly Tensor H = m(p + "h"), N2 = m(p + "n2"), Rstd2 = m(p + "rstd2");
        public readonly Tensor G = m(p + "gate"), U = m(p + "up"), A = m(p + "silu_up");
    }

    private sealed class Activations : IDisposable
    {
        public readonly TensorArena Arena;
        public readonly int B, T, N;
        public readonly Tensor Ids, Labels, Positions;
        /// <summary>Positions holds the last forward's packed-document positions (else 0..T−1 per row).</summary>
        public bool Packed;
        public readonly Tensor[] Hidden;
        private readonly BlockActivations[] _blocks;
        private readonly bool _recompute;
        public readonly Tensor NormOut, RstdF, CeLse;
        public readonly Tensor DRes, DN, DAtt, DQ, DK, DV, DA, DG, DU;

        /// <summary>The tensors of <see cref="ModelLayout.Activations"/>, each allocated by name with <paramref name="m"/> from <paramref name="arena"/>.</summary>
        public Activations(LlamaModel model, TensorArena arena, Func<string, Tensor> m, int batch, int seqLen)
        {
            Arena = arena;
            B = batch;
            T = seqLen;
            N = checked(batch * seqLen);
            var c = model.Config;
            Ids = m("input_ids");
            Labels = m("labels");
            Positions = m("position_ids");
            model._ops.Upload<int>(PositionIds(batch, seqLen), Positions);
            Hidden = new Tensor[c.NumHiddenLayers + 1];
            for (int i = 0; i < Hidden.Length; i++) Hidden[i] = m($"hidden.{i}");
            _recompute = model.LayoutOptions.Recompute;
            _blocks = new BlockActivations[_recompute ? 1 : c.NumHiddenLayers];
            for (int i = 0; i < _blocks.Length; i++) _blocks[i] = new BlockActivations(m, $"block.{i}.");
            (NormOut, RstdF, CeLse) = (m("norm_out"), m("norm_rstd"), m("loss_lse"));
            (DRes, DN, DAtt) = (m("d_residual"), m("d_normed"), m("d_attention"));
            (DQ, DK, DV) = (m("d_q"), m("d_k"), m("d_v"));
            (DA, DG, DU) = (m("d_silu_up"), m("d_gate"), m("d_up"));
        }

        public BlockActivations BlockFor(int layer) => _blocks[_recompute ? 0 : layer];

        public void Dispose() => Arena.Dispose();
    }

    public void Dispose()
    {
        ReleaseActivations();
        _ropeArena?.Dispose();
        _ropeArena = null;
        _params.Dispose();
    }
}
