using System.Runtime.InteropServices;
using NativePeft.IO;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Quantization;
using NativePeft.Runtime;

namespace NativePeft.Optim;

/// <summary>
/// AdamW with decoupled weight decay in torch.optim.AdamW's order (decay first, then the bias-corrected Adam step;
/// <see cref="AdamWMath"/>), in four forms: fp32 or blockwise 8-bit states (bitsandbytes' AdamW8bit layout: m with the
/// signed dynamic map, v with the unsigned one, fp32 absmax per 256; tensors under 4096 elements keep fp32 states),
/// each optionally paged (bitsandbytes' paged optimizers: m and v of parameters with ≥ 1e5 elements in managed memory,
/// prefetched to the device before their update when the device reports concurrent managed access; the driver
/// migrates pages back to the host under memory pressure — this class has no eviction logic of its own).
/// <para>
/// On a <see cref="GpuOps"/> the update runs in kernels/optim.cu (CUDA or the emulator). On any other ops (CpuOps) the
/// C# twin <see cref="AdamWMath"/> runs on host copies (Download → update → Upload), bit-identical to the kernels.
/// Without a GPU (CpuOps) paged state is plain memory and the code path is the same; the emulator's managed memory is
/// host memory.
/// </para>
/// </summary>
public abstract class AdamWOptimizer : IOptimizer
{
    /// <summary>Parameters with at least this many elements get paged (managed) m and v in the paged forms.</summary>
    public const long PagedMinElements = 100_000;

    private readonly IOps _ops;
    private readonly IGpu? _gpu;
    private readonly GpuOptimKernels? _kernels;
    private readonly bool _eightBit, _paged;
    private readonly Dictionary<string, ParamState> _states = new(StringComparer.Ordinal);
    private readonly List<string> _order = [];
    private Tensor? _maps; // F32 [512]: signed map, then unsigned map (device, 8-bit forms only)
    private bool _disposed;

    protected AdamWOptimizer(IOps ops, AdamWOptions? options, bool eightBit, bool paged)
    {
        _ops = ops ?? throw new ArgumentNullException(nameof(ops));
        Options = options ?? new AdamWOptions();
        Options.Validate();
        _eightBit = eightBit;
        _paged = paged;
        _gpu = ops.Device;
        if (_gpu is not null) _kernels = new GpuOptimKernels(_gpu);
    }

    public string Name => (_paged ? "paged-" : "") + (_eightBit ? "adamw8bit" : "adamw");
    public AdamWOptions Options { get; }
    public bool IsEightBit => _eightBit;
    public bool IsPaged => _paged;

    public long StateBytes => _states.Values.Sum(s => s.Bytes);
    public long PagedStateBytes => _states.Values.Sum(s => s.PagedBytes);

    /// <summary>The step counter of a parameter (0 before its first step or when unknown).</summary>
    public long StepCount(string name) => _states.TryGetValue(name, out var s) ? s.Step : 0;

    /// <summary>Whether a parameter's state is 8-bit (false: fp32, or no state yet).</summary>
    public bool IsQuantized(string name) => _states.TryGetValue(name, out var s) && s.Quantized;

    /// <summary>Whether a parameter of n elements gets 8-bit states in this optimizer.</summary>
    public bool QuantizesStateOf(long n) => _eightBit && n >= AdamWMath.Min8BitSize;

    /// <summary>
    /// State bytes of one parameter of n elements (what <see cref="StateBytes"/> adds for it), for memory plans:
    /// 8·n for fp32 state; 2·n + 8·ceil(n/256) for 8-bit state (eightBit and n ≥ 4096).
    /// </summary>
    public static long StateBytesFor(long n, bool eightBit) =>
        eightBit && n >= AdamWMath.Min8BitSize ? 2 * n + 2L * sizeof(float) * AdamWMath.Blocks(n) : 2L * sizeof(float) * n;

    /// <summary>Of <see cref="StateBytesFor"/>, the bytes a paged optimizer on a GPU puts in managed memory (m and v, n ≥ 1e5).</summary>
    public static long PagedStateBytesFor(long n, bool eightBit) =>
        n < PagedMinElements ? 0 : (eightBit && n >= AdamWMath.Min8BitSize ? 2 * n : 2L * sizeof(float) * n);

    /// <summary>
    /// Prefetches every paged (managed) state buffer to the host (cuMemPrefetchAsync to the CPU) on devices with
    /// concurrent managed access, freeing device pages for something else until the next <see cref="Step"/> prefetches
    /// them back; a no-op elsewhere (the driver still migrates on demand). Values are unchanged.
    /// </summary>
    public void PrefetchStateToHost()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_gpu is null || !_gpu.Properties.ConcurrentManagedAccess) return;
        foreach (var s in _states.Values)
            foreach (var b in s.Buffers)
                if (b.Managed) _gpu.Prefetch(b.Tensor.Data, b.Tensor.Bytes, toDevice: false);
    }

    // ----------------------------------------------------------------------------------------------
    // State
    // ----------------------------------------------------------------------------------------------

    private sealed class Buffer(Tensor tensor, bool managed)
    {
        public Tensor Tensor { get; } = tensor;
        public bool Managed { get; } = managed;
    }

    private sealed class ParamState
    {
        public required long Count { get; init; }
        public required bool Quantized { get; init; }
        public long Step { get; set; }
        public required Buffer M { get; init; }       // F32 exp_avg or U8 state1
        public required Buffer V { get; init; }       // F32 exp_avg_sq or U8 state2
        public Buffer? AbsmaxM { get; init; }         // F32 absmax1 (quantized only)
        public Buffer? AbsmaxV { get; init; }
        public IEnumerable<Buffer> Buffers => AbsmaxM is null ? [M, V] : [M, V, AbsmaxM, AbsmaxV!];
        public long Bytes => Buffers.Sum(b => b.Tensor.Bytes);
        public long PagedBytes => Buffers.Where(b => b.Managed).Sum(b => b.Tensor.Bytes);
    }

    private Buffer Allocate(DType dtype, long count, bool pageable)
    {
        int n = checked((int)count);
        if (pageable && _paged && _gpu is not null && count >= PagedMinElements)
        {
            long bytes = count * dtype.ElementSize();
            var ptr = _gpu.AllocManaged(bytes);
            try { _gpu.Memset(ptr, 0, bytes); }
            catch { _gpu.Free(ptr); throw; }
            return new Buffer(new Tensor(ptr, dtype, n), managed: true);
        }
        return new Buffer(_ops.Memory.Allocate(MemoryRegion.Persistent, dtype, n), managed: false);
    }

    private void Free(Buffer b)
    {
        if (b.Managed) _gpu!.Free(b.Tensor.Data);
        else _ops.Memory.Free(b.Tensor);
    }

    private void Free(ParamState s)
    {
        foreach (var b in s.Buffers) Free(b);
    }

    private ParamState Create(long count)
    {
        bool quantized = QuantizesStateOf(count);
        if (!quantized)
            return new ParamState { Count = count, Quantized = false, M = Allocate(DType.F32, count, true), V = Allocate(DType.F32, count, true) };
        int blocks = AdamWMath.Blocks(count);
        var s = new ParamState
        {
            Count = count, Quantized = true,
            M = Allocate(DType.U8, count, true), V = Allocate(DType.U8, count, true),
            AbsmaxM = Allocate(DType.F32, blocks, false), AbsmaxV = Allocate(DType.F32, blocks, false),
        };
        // m = 0 is index 127 of the signed map (v = 0 is index 0 of the unsigned map: the zero fill).
        var zeros = new byte[count];
        zeros.AsSpan().Fill((byte)DynamicMap.SignedZeroIndex);
        _ops.Upload<byte>(zeros, s.M.Tensor);
        return s;
    }

    private void Put(string name, ParamState state)
    {
        if (_states.Remove(name, out var old)) Free(old);
        else _order.Add(name);
        _states[name] = state;
    }

    private Tensor Maps()
    {
        if (_maps is null)
        {
            var maps = _ops.Memory.Allocate(MemoryRegion.Persistent, DType.F32, 512);
            var host = new float[512];
            DynamicMap.Signed.CopyTo(host);
            DynamicMap.Unsigned.CopyTo(host.AsSpan(256));
            _ops.Upload<float>(host, maps);
            _maps = maps;
        }
        return _maps;
    }

    // ----------------------------------------------------------------------------------------------
    // Step
    // ----------------------------------------------------------------------------------------------

    public void Step(IReadOnlyList<(string Name, Tensor Param, Tensor Grad)> parameters, double lr, double gradScale = 1.0)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(parameters);
        if (!(lr >= 0) || double.IsInfinity(lr)) throw new ArgumentOutOfRangeException(nameof(lr), lr, "lr must be finite and >= 0");
        if (!double.IsFinite(gradScale)) throw new ArgumentOutOfRangeException(nameof(gradScale), gradScale, "gradScale must be finite");
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, param, grad) in parameters)
        {
            ArgumentNullException.ThrowIfNull(name);
            if (!seen.Add(name)) throw new ArgumentException($"parameter '{name}' is listed twice", nameof(parameters));
            if (param.DType != DType.F32 || grad.DType != DType.F32)
                throw new ArgumentException($"{Name}: parameter '{name}' is {param}, gradient {grad}: both must be F32");
            if (grad.Count != param.Count)
                throw new ArgumentException($"{Name}: parameter '{name}' has {param.Count} elements, its gradient {grad.Count}");
        }
        foreach (var (name, param, grad) in parameters)
        {
            if (!_states.TryGetValue(name, out var state))
            {
                state = Create(param.Count);
                Put(name, state);
            }
            else if (state.Count != param.Count)
                throw new InvalidOperationException($"{Name}: parameter '{name}' has {param.Count} elements, its state {state.Count}");
            state.Step++;
            var s = AdamWStepScalars.For(Options, lr, state.Step, gradScale);
            if (_kernels is not null) StepDevice(state, param, grad, s);
            else StepHost(state, param, grad, s);
        }
    }

    private void StepDevice(ParamState state, Tensor param, Tensor grad, in AdamWStepScalars s)
    {
        var gpu = _kernels!.Gpu;
        if (gpu.Properties.ConcurrentManagedAccess)
            foreach (var b in state.Buffers)
                if (b.Managed) gpu.Prefetch(b.Tensor.Data, b.Tensor.Bytes, toDevice: true);
        if (!state.Quantized)
        {
            _kernels.AdamWF32(param.Data, grad.Data, state.M.Tensor.Data, state.V.Tensor.Data, param.Count, s);
            return;
        }
        var maps = Maps();
        _kernels.AdamW8BitBlockwise(param.Data, grad.Data, state.M.Tensor.Data, state.V.Tensor.Data,
            state.AbsmaxM!.Tensor.Data, state.AbsmaxV!.Tensor.Data, maps.Data, maps.Data.Offset(256 * sizeof(float)), param.Count, s);
    }

    private void StepHost(ParamState state, Tensor param, Tensor grad, in AdamWStepScalars s)
    {
        // Host memory (CpuOps): update in place, no copies (the same AdamWMath, so the same values).
        if (CpuOps.TryGetHostSpan<float>(_ops, param, out var hp) && CpuOps.TryGetHostSpan<float>(_ops, grad, out var hg))
        {
            if (!state.Quantized && CpuOps.TryGetHostSpan<float>(_ops, state.M.Tensor, out var hm)
                                  && CpuOps.TryGetHostSpan<float>(_ops, state.V.Tensor, out var hv))
            {
                AdamWMath.StepF32(hp, hg, hm, hv, s);
                return;
            }
            if (state.Quantized && CpuOps.TryGetHostSpan<byte>(_ops, state.M.Tensor, out var hqm)
                                && CpuOps.TryGetHostSpan<byte>(_ops, state.V.Tensor, out var hqv)
                                && CpuOps.TryGetHostSpan<float>(_ops, state.AbsmaxM!.Tensor, out var ham)
                                && CpuOps.TryGetHostSpan<float>(_ops, state.AbsmaxV!.Tensor, out var hav))
            {
                AdamWMath.Step8Bit(hp, hg, hqm, hqv, ham, hav, s);
                return;
            }
        }
        int n = checked((int)param.Count);
        var p = new float[n];
        var g = new float[n];
        _ops.Download<float>(param, p);
        _ops.Download<float>(grad, g);
        if (!state.Quantized)
        {
            var m = new float[n];
            var v = new float[n];
            _ops.Download<float>(state.M.Tensor, m);
            _ops.Download<float>(state.V.Tensor, v);
            AdamWMath.StepF32(p, g, m, v, s);
            _ops.Upload<float>(m, state.M.Tensor);
            _ops.Upload<float>(v, state.V.Tensor);
        }
        else
        {
            int blocks = AdamWMath.Blocks(n);
            var qm = new byte[n];
            var qv = new byte[n];
            var am = new float[blocks];
            var av = new float[blocks];
            _ops.Download<byte>(state.M.Tensor, qm);
            _ops.Download<byte>(state.V.Tensor, qv);
            _ops.Download<float>(state.AbsmaxM!.Tensor, am);
            _ops.Download<float>(state.AbsmaxV!.Tensor, av);
            AdamWMath.Step8Bit(p, g, qm, qv, am, av, s);
            _ops.Upload<byte>(qm, state.M.Tensor);
            _ops.Upload<byte>(qv, state.V.Tensor);
            _ops.Upload<float>(am, state.AbsmaxM.Tensor);
            _ops.Upload<float>(av, state.AbsmaxV.Tensor);
        }
        _ops.Upload<float>(p, param);
    }

    // ----------------------------------------------------------------------------------------------
    // Checkpoints
    // ----------------------------------------------------------------------------------------------

    private T[] Read<T>(Tensor t) where T : unmanaged
    {
        var a = new T[t.Count];
        _ops.Download<T>(t, a);
        return a;
    }

    private static SafetensorsTensor Entry<T>(string name, T[] values) where T : unmanaged =>
        SafetensorsTensor.From(name, [values.LongLength], values);

    public IReadOnlyList<SafetensorsTensor> SaveState()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var list = new List<SafetensorsTensor>();
        foreach (var name in _order)
        {
            var s = _states[name];
            list.Add(Entry(name + ".step", new[] { s.Step }));
            if (s.Quantized)
            {
                list.Add(Entry(name + ".state1", Read<byte>(s.M.Tensor)));
                list.Add(Entry(name + ".absmax1", Read<float>(s.AbsmaxM!.Tensor)));
                list.Add(Entry(name + ".state2", Read<byte>(s.V.Tensor)));
                list.Add(Entry(name + ".absmax2", Read<float>(s.AbsmaxV!.Tensor)));
            }
            else
            {
                list.Add(Entry(name + ".exp_avg", Read<float>(s.M.Tensor)));
                list.Add(Entry(name + ".exp_avg_sq", Read<float>(s.V.Tensor)));
            }
        }
        return list;
    }

    public void LoadState(IEnumerable<SafetensorsTensor> tensors)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(tensors);
        var byName = new Dictionary<string, SafetensorsTensor>(StringComparer.Ordinal);
        foreach (var t in tensors) byName[t.Name] = t;
        foreach (var stepKey in byName.Keys.Where(k => k.EndsWith(".step", StringComparison.Ordinal)).ToList())
        {
            string name = stepKey[..^".step".Length];
            SafetensorsTensor Get(string suffix, DType dtype)
            {
                if (!byName.TryGetValue(name + suffix, out var t))
                    throw new ArgumentException($"{Name}: optimizer state of '{name}' lacks '{name}{suffix}'");
                if (t.DType != dtype)
                    throw new ArgumentException($"{Name}: '{name}{suffix}' is {t.DType}, expected {dtype}");
                return t;
            }
            long step = MemoryMarshal.Cast<byte, long>(Get(".step", DType.I64).Data.Span)[0];
            bool quantized = byName.ContainsKey(name + ".state1");
            var first = quantized ? Get(".state1", DType.U8) : Get(".exp_avg", DType.F32);
            long count = first.Data.Length / (quantized ? 1 : sizeof(float));
            if (quantized != QuantizesStateOf(count))
                throw new ArgumentException($"{Name}: '{name}' ({count} elements) has {(quantized ? "8-bit" : "fp32")} state in the checkpoint; " +
                    $"this optimizer keeps {(QuantizesStateOf(count) ? "8-bit" : "fp32")} state for it");
            var state = Create(count);
            try
            {
                state.Step = step;
                if (quantized)
                {
                    Upload<byte>(Get(".state1", DType.U8), state.M.Tensor);
                    Upload<float>(Get(".absmax1", DType.F32), state.AbsmaxM!.Tensor);
                    Upload<byte>(Get(".state2", DType.U8), state.V.Tensor);
                    Upload<float>(Get(".absmax2", DType.F32), state.AbsmaxV!.Tensor);
                }
                else
                {
                    Upload<float>(Get(".exp_avg", DType.F32), state.M.Tensor);
                    Upload<float>(Get(".exp_avg_sq", DType.F32), state.V.Tensor);
                }
            }
            catch
            {
                Free(state);
                throw;
            }
            Put(name, state);
        }
    }

    private void Upload<T>(SafetensorsTensor source, Tensor destination) where T : unmanaged
    {
        var values = MemoryMarshal.Cast<byte, T>(source.Data.Span);
        if (values.Length != destination.Count)
            throw new ArgumentException($"{Name}: '{source.Name}' has {values.Length} elements, expected {destination.Count}");
        _ops.Upload(values, destination);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var s in _states.Values) Free(s);
        _states.Clear();
        _order.Clear();
        if (_maps is not null) _ops.Memory.Free(_maps);
        _maps = null;
        GC.SuppressFinalize(this);
    }
}

/// <summary>AdamW with fp32 m and v on the ops' memory.</summary>
public sealed class AdamW(IOps ops, AdamWOptions? options = null) : AdamWOptimizer(ops, options, eightBit: false, paged: false);

/// <summary>AdamW with fp32 m and v, in managed memory for parameters of ≥ 1e5 elements.</summary>
public sealed class PagedAdamW(IOps ops, AdamWOptions? options = null) : AdamWOptimizer(ops, options, eightBit: false, paged: true);

/// <summary>AdamW with blockwise 8-bit m and v (fp32 below 4096 elements).</summary>
public sealed class AdamW8bit(IOps ops, AdamWOptions? options = null) : AdamWOptimizer(ops, options, eightBit: true, paged: false);

/// <summary>AdamW8bit with the 8-bit m and v in managed memory for parameters of ≥ 1e5 elements.</summary>
public sealed class PagedAdamW8bit(IOps ops, AdamWOptions? options = null) : AdamWOptimizer(ops, options, eightBit: true, paged: true);
