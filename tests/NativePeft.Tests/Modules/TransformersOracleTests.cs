using System.Text.Json;
using System.Text.Json.Nodes;
using NativePeft.IO;
using NativePeft.Modules;
using NativePeft.Numerics;
using NativePeft.Ops;
using NativePeft.Training;
using NUnit.Framework;

namespace NativePeft.Tests.Modules;

/// <summary>
/// The whole model against transformers + PEFT, with no Python here: tests/reference/gen_model_oracle.py (gpu-check's
/// `oracle` section, on the GPU machine) wrote Data/oracle/ — a random two-shard bf16 Llama with GQA and Llama-3 RoPE
/// scaling ("tiny-gqa"), its logits and loss on a fixed batch, the same for the shipped built-in model, a PEFT-saved
/// adapter with its logits and loss, and merge_and_unload's merged weights (checksums and first/last rows). Each
/// comparison goes through our normal path (HfCheckpoint.Open, LlamaModel.Load on CpuOps, PeftAdapter.Load + ApplyTo as
/// `eval --adapter`, MergeExport.Write as `merge`), so a wiring mistake shared by every path of ours (a residual, a
/// norm's placement, RoPE's pairing, GQA's head mapping, the LoRA scaling) fails here, and each has a planted-defect
/// control that must break the same bound. Without the folder every test is ignored with "oracle files not generated".
/// NATIVEPEFT_ORACLE_DIR points the tests at another folder of the same format.
/// <para>
/// The bound, derived from fp32 arithmetic: both sides compute in fp32 from the same bf16 weights (exactly widened),
/// so they differ only by rounding. A dot product of n fp32 terms is within γₙ ≈ n·u (u = 2⁻²⁴) of its terms' magnitude,
/// a norm, softmax, exp, SiLU or RoPE rotation within a few u. A logit is the end of one chain per layer — the q/k/v GEMM
/// (n = hidden), scores (n = head_dim), P·V (n = T), o_proj (n = heads·head_dim), gate/up (n = hidden), down (n =
/// intermediate), with LoRA each of those four stages adds its x·Aᵀ (n = in) and ·Bᵀ (n = r), and about 16 u for the
/// elementwise steps — then the final norm (8 u) and lm_head (n = hidden). With the oracles' weights (std 0.2 and the
/// built-in model's trained ones) each stage amplifies an error by O(1), so one implementation is within Σ n·u of the
/// logit's scale, |x| + rms(logits) (the rms term for logits that cancel to near zero), and two implementations within
/// twice that: <see cref="ChainUnits"/> (1744 u for tiny-gqa, 6672 u for the built-in model, 3216 u with its adapter).
/// The loss must follow from the logits: within twice their largest difference plus its own reductions' rounding
/// (<see cref="LossTolerance"/>).
/// Our F64 run is held to the same bound (only transformers' rounding is left in it).
/// </para>
/// </summary>
public class TransformersOracleTests
{
    public const string DirVariable = "NATIVEPEFT_ORACLE_DIR";
    private const double U32 = 1.0 / (1 << 24);
    private string _tmp = "";

    [SetUp]
    public void SetUp() => _tmp = Directory.CreateTempSubdirectory("nativepeft-oracle-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_tmp, recursive: true);

    private static string OracleDir => Environment.GetEnvironmentVariable(DirVariable) is { Length: > 0 } d
        ? d : Path.Combine(TestContext.CurrentContext.TestDirectory, "Data", "oracle");

    /// <summary>oracle.json, or the test is ignored with the reason the suite's summary groups skips by.</summary>
    private static JsonElement Oracle()
    {
        string path = Path.Combine(OracleDir, "oracle.json");
        if (!File.Exists(path))
            Assert.Ignore("oracle files not generated: run `./gpu-check --only oracle` on a GPU machine and commit its build/oracle/ as tests/NativePeft.Tests/Data/oracle/ (docs/gpu-validation.md)");
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var root = doc.RootElement.Clone();
        // OracleStandIn's folder (our own numbers) exercises the plumbing through NATIVEPEFT_ORACLE_DIR; committed as the oracle it would prove nothing.
        if (Environment.GetEnvironmentVariable(DirVariable) is not { Length: > 0 } && root.GetProperty("device").GetString()!.StartsWith("stand-in", StringComparison.Ordinal))
            Assert.Fail($"{path}: a stand-in written by OracleStandIn, not by gen_model_oracle.py with transformers");
        return root;
    }

    private static string In(string relative) => Path.Combine(OracleDir, relative);

    private static int[] Ids(JsonElement section, out int batch, out int seq)
    {
        var rows = section.GetProperty("ids").EnumerateArray().Select(r => r.EnumerateArray().Select(v => v.GetInt32()).ToArray()).ToArray();
        batch = rows.Length;
        seq = rows[0].Length;
        return rows.SelectMany(r => r).ToArray();
    }

    private static double[] Logits(JsonElement section)
    {
        using var f = SafetensorsFile.Open(In(section.GetProperty("logits").GetString()!));
        return Array.ConvertAll(f.ReadArray<float>("logits"), v => (double)v);
    }

    /// <summary>
    /// Σ n over the forward chain of a logit (see the class comment), twice (two implementations): the bound in units
    /// of u32·(|logit| + rms(logits)).
    /// </summary>
    internal static double ChainUnits(LlamaConfig c, int seqLen, int loraRank = 0)
    {
        int lora(int inFeatures) => loraRank == 0 ? 0 : inFeatures + loraRank;
        double perLayer = c.HiddenSize + lora(c.HiddenSize)              // q/k/v
                        + c.HeadDim + seqLen                             // scores, P·V
                        + c.QueryDim + lora(c.QueryDim)                  // o_proj
                        + c.HiddenSize + lora(c.HiddenSize)              // gate/up
                        + c.IntermediateSize + lora(c.IntermediateSize)  // down
                        + 16;                                            // norms, RoPE, softmax, exp, SiLU, residual adds
        return 2 * (c.NumHiddenLayers * perLayer + 8 + c.HiddenSize);
    }

    /// <summary>max over the elements of |got − reference| / (u32·(|reference| + rms(reference))).</summary>
    internal static double WorstUnits(double[] got, double[] reference)
    {
        Assert.That(got.Length, Is.EqualTo(reference.Length), "logit count");
        double rms = Math.Sqrt(reference.Sum(x => x * x) / reference.Length), worst = 0;
        for (int i = 0; i < reference.Length; i++)
            worst = Math.Max(worst, Math.Abs(got[i] - reference[i]) / (U32 * (Math.Abs(reference[i]) + rms)));
        return worst;
    }

    /// <summary>
    /// The loss, mean over N predicted tokens of (lse − target logit), moves by at most twice the largest logit
    /// difference actually seen (|Δlse| and |Δtarget| are each within it), plus each side's rounding of the loss from its
    /// logits: the V-term sum under the log (relative γ_V, so V·u absolute after the log) and the N-term mean (N·u·|loss|).
    /// </summary>
    internal static double LossTolerance(double[] ours, double[] reference, double loss, int vocab, int tokens)
    {
        double maxDiff = 0;
        for (int i = 0; i < reference.Length; i++) maxDiff = Math.Max(maxDiff, Math.Abs(ours[i] - reference[i]));
        return 2 * maxDiff + 2 * U32 * (vocab + tokens * Math.Abs(loss));
    }

    /// <summary>Loss and logits [B·T·V] of <paramref name="checkpointDir"/> (with the adapter, if any) on the batch, through our normal path.</summary>
    private static (double Loss, double[] Logits, LlamaConfig Config) Run(string checkpointDir, int[] ids, int batch, int seq, DType compute, PeftAdapter? adapter = null)
    {
        using var ck = HfCheckpoint.Open(checkpointDir);
        using var ops = new CpuOps();
        using var model = LlamaModel.Load(ck, ops, new LlamaModelOptions { ComputeDType = compute, Lora = adapter?.Config.ToLoraSettings() });
        adapter?.ApplyTo(model);
        double loss = model.Forward(ids, ids, batch, seq);   // labels = ids: the model shifts, as transformers does
        var logits = ops.Memory.Allocate(compute == DType.F64 ? DType.F64 : DType.F32, batch * seq, ck.Config.VocabSize);
        try
        {
            model.Logits(logits);
            return (loss, ModelTestKit.Get(ops, logits), ck.Config);
        }
        finally { ops.Memory.Free(logits); }
    }

    private static void AssertMatches(string what, (double Loss, double[] Logits, LlamaConfig Config) ours, JsonElement section, int batch, int seq, int loraRank = 0)
    {
        var reference = Logits(section);
        double theirLoss = section.GetProperty("loss").GetDouble();
        double bound = ChainUnits(ours.Config, seq, loraRank);
        double units = WorstUnits(ours.Logits, reference);
        double lossTol = LossTolerance(ours.Logits, reference, theirLoss, ours.Config.VocabSize, batch * (seq - 1));
        TestContext.Out.WriteLine($"{what}: logits worst {units:F0} units (bound {bound:F0}); loss {ours.Loss:R} vs transformers {theirLoss:R} (|Δ| {Math.Abs(ours.Loss - theirLoss):E2}, bound {lossTol:E2})");
        Assert.That(units, Is.LessThanOrEqualTo(bound), $"{what}: logits, worst element in units of u32·(|x| + rms)");
        Assert.That(ours.Loss, Is.EqualTo(theirLoss).Within(lossTol), $"{what}: loss");
    }

    private static string TinyDir => In("tiny-gqa");

    [TestCase(DType.F32)]
    [TestCase(DType.F64)]
    public void TinyGqaTwoBf16ShardsMatchTransformers(DType compute)
    {
        var tiny = Oracle().GetProperty("tiny_gqa");
        using (var ck = HfCheckpoint.Open(TinyDir))
        {
            Assert.That(ck.FilePaths, Has.Count.EqualTo(2), "two shards");
            Assert.That(ck.TensorNames.Select(n => ck.GetInfo(n).DType).Distinct(), Is.EqualTo(new[] { DType.BF16 }), "bf16 weights");
            Assert.That(ck.Config.NumKeyValueHeads, Is.LessThan(ck.Config.NumAttentionHeads), "GQA");
            Assert.That(ck.Config.TieWordEmbeddings, Is.False);
        }
        var ids = Ids(tiny, out int b, out int t);
        AssertMatches($"tiny-gqa {compute}", Run(TinyDir, ids, b, t, compute), tiny, b, t);
    }

    [TestCase(DType.F32)]
    [TestCase(DType.F64)]
    public void BuiltinModelMatchesTransformers(DType compute)
    {
        var section = Oracle().GetProperty("builtin");
        var ids = Ids(section, out int b, out int t);
        AssertMatches($"built-in {compute}", Run(BuiltinModel.Require(), ids, b, t, compute), section, b, t);
    }

    [TestCase(DType.F32)]
    [TestCase(DType.F64)]
    public void PeftSavedAdapterMatchesPeft(DType compute)
    {
        var oracle = Oracle();
        var section = oracle.GetProperty("adapter");
        var adapter = PeftAdapter.Load(In(section.GetProperty("dir").GetString()!));
        Assert.That(adapter.Config.R, Is.EqualTo(section.GetProperty("r").GetInt32()));
        Assert.That(adapter.Modules, Has.Count.EqualTo(7 * 2), "the seven projections of both layers");
        var ids = Ids(oracle.GetProperty("tiny_gqa"), out int b, out int t);
        AssertMatches($"adapter {compute}", Run(TinyDir, ids, b, t, compute, adapter), section, b, t, adapter.Config.R);
    }

    /// <summary>
    /// Our merge (as `nativepeft merge --dtype fp32`) against merge_and_unload. Per element both compute W + s·(B·A) in
    /// fp32 from the same W (bf16, widened) and the same A, B: the r-term sum and the product by s round within
    /// (r + 1)·u·s·Σₖ|B_ik·A_kj| on each side, the add once within u·|W'|, so two implementations differ by at most
    /// 2·((r + 1)·u·s·Σₖ|B_ik·A_kj| + u·|W'|) per element, and a sum (of squares) by the sum of those (times |a + b|).
    /// </summary>
    [Test]
    public void MergeMatchesMergeAndUnload()
    {
        var oracle = Oracle();
        var adapter = PeftAdapter.Load(In(oracle.GetProperty("adapter").GetProperty("dir").GetString()!));
        var worst = MergeWorst(oracle, adapter);
        TestContext.Out.WriteLine($"merge: worst {worst:F3} of the bound");
        Assert.That(worst, Is.LessThanOrEqualTo(1), "merged weights: worst row element, sum or sum of squares as a fraction of its bound");
    }

    /// <summary>The largest |ours − theirs| / bound over the rows, sums and sums of squares of every merged weight.</summary>
    private double MergeWorst(JsonElement oracle, PeftAdapter adapter)
    {
        string outDir = Path.Combine(_tmp, "merged-" + Guid.NewGuid().ToString("N"));
        using (var ck = HfCheckpoint.Open(TinyDir))
            MergeExport.Write(outDir, ck, adapter, DType.F32, maxShardBytes: 1L << 30);
        var merged = oracle.GetProperty("merged");
        using var rows = SafetensorsFile.Open(In(merged.GetProperty("rows").GetString()!));
        using var ours = HfCheckpoint.Open(outDir);
        // The bound uses the adapter as PEFT saved it (the reference's A, B and scaling), never the one under test.
        var truth = PeftAdapter.Load(In(oracle.GetProperty("adapter").GetProperty("dir").GetString()!));
        double s = truth.Scaling, worst = 0;
        int count = 0;
        foreach (var w in merged.GetProperty("weights").EnumerateObject())
        {
            count++;
            var shape = w.Value.GetProperty("shape").EnumerateArray().Select(v => v.GetInt32()).ToArray();
            int outF = shape[0], inF = shape[1];
            var got = ours.ReadArray<float>(w.Name);
            Assert.That(got, Has.Length.EqualTo(outF * inF), w.Name);
            var module = truth.Modules.Single(m => m.BaseWeightName == w.Name);
            double Bound(int i, int j, double value)
            {
                double ba = 0;
                for (int k = 0; k < module.Rank; k++) ba += Math.Abs((double)module.B[i * module.Rank + k] * module.A[k * inF + j]);
                return 2 * ((module.Rank + 1) * U32 * s * ba + U32 * Math.Abs(value));
            }
            foreach (var (tag, row) in new[] { ("row0", 0), ("row_last", outF - 1) })
            {
                var theirs = rows.ReadArray<float>($"{w.Name}.{tag}");
                for (int j = 0; j < inF; j++)
                    worst = Math.Max(worst, Math.Abs(got[row * inF + j] - theirs[j]) / Bound(row, j, theirs[j]));
            }
            double sum = 0, sumSq = 0, sumBound = 0, sumSqBound = 0;
            for (int i = 0; i < outF; i++)
                for (int j = 0; j < inF; j++)
                {
                    double v = got[i * inF + j], e = Bound(i, j, v);
                    sum += v;
                    sumSq += v * v;
                    sumBound += e;
                    sumSqBound += e * (2 * Math.Abs(v) + e);
                }
            worst = Math.Max(worst, Math.Abs(sum - w.Value.GetProperty("sum").GetDouble()) / sumBound);
            worst = Math.Max(worst, Math.Abs(sumSq - w.Value.GetProperty("sum_sq").GetDouble()) / sumSqBound);
        }
        Assert.That(count, Is.EqualTo(7 * 2), "every merged projection of both layers");
        return worst;
    }

    // ------------------------------------------------------------------ planted defects: the bounds must catch them

    /// <summary>A copy of <paramref name="dir"/> whose config.json has rope_theta × <paramref name="factor"/> (in both
    /// the classic field and transformers 5's rope_parameters, whichever it has).</summary>
    private string WithRopeTheta(string dir, double factor)
    {
        string copy = Path.Combine(_tmp, Path.GetFileName(dir) + "-theta");
        Directory.CreateDirectory(copy);
        foreach (var f in Directory.GetFiles(dir)) File.Copy(f, Path.Combine(copy, Path.GetFileName(f)));
        var root = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        int changed = 0;
        foreach (var obj in new[] { root, root["rope_parameters"] as JsonObject, root["rope_scaling"] as JsonObject })
            if (obj?["rope_theta"] is JsonValue v) { obj["rope_theta"] = v.GetValue<double>() * factor; changed++; }
        Assert.That(changed, Is.GreaterThan(0), "config.json has a rope_theta to change");
        File.WriteAllText(Path.Combine(copy, "config.json"), root.ToJsonString());
        return copy;
    }

    /// <summary>
    /// RoPE's theta 1 % larger (every rotation angle slightly off: what a wrong frequency or pairing looks like at its
    /// mildest) must break the logits bound, on tiny-gqa and on the built-in model.
    /// </summary>
    [TestCase("tiny-gqa")]
    [TestCase("builtin")]
    public void ARopeThetaOffByOnePercentBreaksTheBound(string which)
    {
        var oracle = Oracle();
        var section = oracle.GetProperty(which == "tiny-gqa" ? "tiny_gqa" : "builtin");
        var ids = Ids(section, out int b, out int t);
        string dir = WithRopeTheta(which == "tiny-gqa" ? TinyDir : BuiltinModel.Require(), 1.01);
        var wrong = Run(dir, ids, b, t, DType.F32);
        double units = WorstUnits(wrong.Logits, Logits(section)), bound = ChainUnits(wrong.Config, t);
        TestContext.Out.WriteLine($"{which} with theta × 1.01: worst {units:F0} units (bound {bound:F0})");
        Assert.That(units, Is.GreaterThan(bound), "the bound must catch a 1 % theta error");
    }

    /// <summary>The adapter's lora_alpha 1 % larger (the scaling off by 1 %) must break the adapter's logits bound.</summary>
    [Test]
    public void AnAdapterScalingOffByOnePercentBreaksTheBound()
    {
        var oracle = Oracle();
        var section = oracle.GetProperty("adapter");
        var adapter = PeftAdapter.Load(In(section.GetProperty("dir").GetString()!));
        var wrongAdapter = new PeftAdapter(adapter.Config with { LoraAlpha = adapter.Config.LoraAlpha * 1.01 }, adapter.Modules);
        var ids = Ids(oracle.GetProperty("tiny_gqa"), out int b, out int t);
        var wrong = Run(TinyDir, ids, b, t, DType.F32, wrongAdapter);
        double units = WorstUnits(wrong.Logits, Logits(section)), bound = ChainUnits(wrong.Config, t, adapter.Config.R);
        TestContext.Out.WriteLine($"adapter with lora_alpha × 1.01: worst {units:F0} units (bound {bound:F0})");
        Assert.That(units, Is.GreaterThan(bound), "the bound must catch a 1 % scaling error");
    }

    /// <summary>Merging with lora_alpha 1e-4 larger must break the merge's bound (rows or checksums).</summary>
    [Test]
    public void AMergeScalingOffByOneInTenThousandBreaksTheBound()
    {
        var oracle = Oracle();
        var adapter = PeftAdapter.Load(In(oracle.GetProperty("adapter").GetProperty("dir").GetString()!));
        var wrong = new PeftAdapter(adapter.Config with { LoraAlpha = adapter.Config.LoraAlpha * (1 + 1e-4) }, adapter.Modules);
        double worst = MergeWorst(oracle, wrong);
        TestContext.Out.WriteLine($"merge with lora_alpha × (1 + 1e-4): worst {worst:F1} of the bound");
        Assert.That(worst, Is.GreaterThan(1), "the bound must catch a 1e-4 scaling error");
    }
}
