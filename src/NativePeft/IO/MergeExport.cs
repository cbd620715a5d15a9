using System.Buffers;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using NativePeft.Numerics;

namespace NativePeft.IO;

/// <summary>
/// Merges a PEFT LoRA adapter into a Hugging Face Llama checkpoint and writes the result as a new checkpoint.
/// </summary>
public static class MergeExport
{
    /// <summary>
    /// Writes <paramref name="outDir"/> = <paramref name="baseCheckpoint"/> with every adapted weight replaced by
    /// W' = W + scaling·(B·A), computed in fp32 as PEFT's merge does (delta = (B @ A) · scaling, then W += delta; the
    /// B·A sum runs over r in order with fp32 accumulation), rounded once to <paramref name="outDType"/>. A bitsandbytes
    /// 4-bit base weight is dequantized to fp32 first (absmax · code, as our QLoRA forward uses it) and comes out full
    /// precision; its quant-state tensors are dropped. Every other tensor the config expects (embeddings, norms,
    /// lm_head unless tied) is converted to <paramref name="outDType"/> (widening is exact; narrowing rounds to nearest
    /// even). config.json is the base config with torch_dtype = outDType (and no quantization_config). Shards and
    /// index are written by <see cref="HfCheckpoint.Write"/> (transformers' layout, {"format": "pt"} metadata; on error
    /// nothing is left behind).
    /// <para>
    /// Streaming: each output tensor is computed when its bytes are written and dropped when the next is computed, so
    /// the host holds about one base tensor in fp32 plus one output tensor, not the whole model.
    /// </para>
    /// </summary>
    /// <param name="outDType">BF16 or F16 (what HF checkpoints ship), or F32.</param>
    /// <exception cref="PeftAdapterException">The adapter does not fit the base (naming the key and both shapes).</exception>
    /// <exception cref="HfCheckpointException">The base checkpoint is invalid (a non-finite weight included), or the output folder already holds a checkpoint.</exception>
    /// <exception cref="NonFiniteValuesException">A merged tensor is not finite (NaN, ±inf, |x| &gt; 1e30); nothing is left behind.</exception>
    public static void Write(string outDir, HfCheckpoint baseCheckpoint, PeftAdapter adapter, DType outDType, long maxShardBytes)
    {
        ArgumentNullException.ThrowIfNull(outDir);
        ArgumentNullException.ThrowIfNull(baseCheckpoint);
        ArgumentNullException.ThrowIfNull(adapter);
        if (outDType is not (DType.BF16 or DType.F16 or DType.F32))
            throw new ArgumentException($"outDType {outDType}: a merged checkpoint is written in BF16, F16 or F32", nameof(outDType));
        if (maxShardBytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(maxShardBytes), maxShardBytes, "must be positive");
        baseCheckpoint.Validate();
        var config = baseCheckpoint.Config;
        CheckFits(baseCheckpoint, adapter);

        var slot = new OneTensorSlot();
        var tensors = new List<SafetensorsTensor>();
        foreach (var (name, shape) in config.ExpectedTensors())
        {
            long count = DTypes.ElementCount(shape);
            long bytes = count * outDType.ElementSize();
            if (bytes > int.MaxValue)
                throw new HfCheckpointException(baseCheckpoint.Directory, $"{name}: {bytes} bytes in {outDType.SafetensorsName()} do not fit one safetensors tensor buffer (2 GiB)");
            var module = ModuleFor(adapter, name);
            string n = name;
            var lazy = new LazyTensor(slot, (int)bytes, () => Produce(baseCheckpoint, n, shape, module, (float)adapter.Scaling, outDType));
            tensors.Add(new SafetensorsTensor(name, outDType, (long[])shape.Clone(), lazy.AsMemory()));
        }
        HfCheckpoint.Write(outDir, config with { TorchDtype = outDType }, tensors, maxShardBytes);
    }

    /// <summary>Every adapter module must adapt a layer that exists, with [out, in] equal to the base weight's shape.</summary>
    private static void CheckFits(HfCheckpoint ck, PeftAdapter adapter)
    {
        var problems = new List<string>();
        var config = ck.Config;
        foreach (var m in adapter.Modules)
        {
            if (m.Layer >= config.NumHiddenLayers)
            {
                problems.Add($"{m.KeyA}: the base has no layer {m.Layer} (it has {config.NumHiddenLayers} layers)");
                continue;
            }
            long[] shape = ck.GetShape(m.BaseWeightName);
            if (shape.Length != 2 || shape[0] != m.OutFeatures || shape[1] != m.InFeatures)
                problems.Add($"{m.KeyA}: the adapter's lora_B·lora_A is [{m.OutFeatures}, {m.InFeatures}], the base's {m.BaseWeightName} is {HfFiles.Shape(shape)} (was the adapter trained on another base model?)");
        }
        if (problems.Count > 0)
            throw new PeftAdapterException(adapter.Source ?? "PEFT adapter", $"the adapter does not fit the base checkpoint {ck.Directory}", problems);
    }

    private static PeftLoraModule? ModuleFor(PeftAdapter adapter, string weightName)
    {
        const string Prefix = "model.layers.";
        if (!weightName.StartsWith(Prefix, StringComparison.Ordinal) || !weightName.EndsWith("_proj.weight", StringComparison.Ordinal)) return null;
        int dot = weightName.IndexOf('.', Prefix.Length);
        if (dot < 0 || !int.TryParse(weightName.AsSpan(Prefix.Length, dot - Prefix.Length), out int layer)) return null;
        string target = weightName[(weightName.LastIndexOf('.', weightName.Length - ".weight".Length - 1) + 1)..^".weight".Length];
        var m = adapter.Find(layer, target);
        return m is not null && m.BaseWeightName == weightName ? m : null;
    }

    /// <summary>One output tensor's bytes: the base in fp32 (read or dequantized), merged when adapted, converted.</summary>
    private static byte[] Produce(HfCheckpoint ck, string name, long[] shape, PeftLoraModule? module, float scaling, DType outDType)
    {
        float[] w = ck.IsQuantized(name) ? ck.LoadQuantized(name).DequantizeToSingle() : ck.ReadArray<float>(name);
        if (module is not null) MergeInto(w, module, scaling);
        // The merged model must be finite (W + scaling·B·A can overflow even when W, A and B are finite): nothing is written.
        if (Finite.FirstBad(w) is long bad and >= 0)
            throw new NonFiniteValuesException(name, $"{Finite.Describe(bad, w[bad])} in the merged weight{(module is null ? "" : $" (W + {scaling}·B·A of {module.KeyA})")}; no model written");
        var bytes = new byte[(long)w.Length * outDType.ElementSize()];
        switch (outDType)
        {
            case DType.F32: MemoryMarshal.AsBytes(w.AsSpan()).CopyTo(bytes); break;
            case DType.BF16: BFloat16.FromSingle(w, MemoryMarshal.Cast<byte, BFloat16>(bytes.AsSpan())); break;
            default:
                var h = MemoryMarshal.Cast<byte, Half>(bytes.AsSpan());
                for (int i = 0; i < w.Length; i++) h[i] = (Half)w[i];
                break;
        }
        return bytes;
    }

    /// <summary>
    /// W [out, in] += scaling · (B [out, r] · A [r, in]) in fp32, row by row: delta_row = Σ_k B[o, k]·A[k, :] (k in
    /// order, fp32), then W_row = delta_row·scaling + W_row. Rows run in parallel (each row's arithmetic is fixed, so
    /// the result does not depend on the thread count).
    /// </summary>
    internal static void MergeInto(float[] w, PeftLoraModule m, float scaling)
    {
        int inF = m.InFeatures, r = m.Rank;
        if (w.LongLength != (long)m.OutFeatures * inF)
            throw new ArgumentException($"{m.BaseWeightName}: {w.Length} values, expected [{m.OutFeatures}, {inF}]", nameof(w));
        Parallel.For(0, m.OutFeatures, () => new float[inF], (o, _, delta) =>
        {
            Array.Clear(delta);
            for (int k = 0; k < r; k++)
                TensorPrimitives.MultiplyAdd(m.A.AsSpan(k * inF, inF), m.B[o * r + k], delta, delta);
            var row = w.AsSpan(o * inF, inF);
            TensorPrimitives.MultiplyAdd(delta, scaling, row, row);
            return delta;
        }, _ => { });
    }

    /// <summary>Holds the bytes of at most one <see cref="LazyTensor"/> at a time.</summary>
    private sealed class OneTensorSlot
    {
        private LazyTensor? _owner;
        private byte[]? _bytes;

        public byte[] Get(LazyTensor t)
        {
            lock (this)
            {
                if (!ReferenceEquals(_owner, t) || _bytes is null)
                {
                    _owner = null;
                    _bytes = null;  // drop the previous tensor before computing the next
                    var b = t.Compute();
                    _bytes = b;
                    _owner = t;
                }
                return _bytes;
            }
        }
    }

    /// <summary>
    /// Bytes computed on first access to <see cref="Memory{T}.Span"/> and recomputed (deterministically) if another
    /// tensor has taken the slot since. The length is known without computing. Not pinnable.
    /// </summary>
    private sealed class LazyTensor(OneTensorSlot slot, int length, Func<byte[]> produce) : MemoryManager<byte>
    {
        public Memory<byte> AsMemory() => CreateMemory(length);

        public byte[] Compute()
        {
            var b = produce();
            if (b.Length != length) throw new InvalidOperationException($"a merged tensor has {b.Length} bytes, expected {length}");
            return b;
        }

        public override Span<byte> GetSpan() => slot.Get(this);

        public override MemoryHandle Pin(int elementIndex = 0) =>
            throw new NotSupportedException("merged tensors are computed on demand and cannot be pinned");

        public override void Unpin() { }

        protected override void Dispose(bool disposing) { }
    }
}
