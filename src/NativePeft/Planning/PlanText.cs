using System.Globalization;
using System.Text;

namespace NativePeft.Planning;

/// <summary>
/// The text forms <see cref="MemoryPlan"/> and <see cref="InferencePlan"/> share: the plain-text table of their rows and
/// a flat JSON object written field by field (invariant culture, "total_bytes" last).
/// </summary>
internal sealed class PlanText
{
    private readonly StringBuilder _sb = new("{\n");

    /// <summary>A plain-text table: category, bytes, human-readable size, one row a line.</summary>
    public static string Table(IReadOnlyList<(string Category, string Key, long Bytes)> rows)
    {
        int w = rows.Max(r => r.Category.Length);
        var sb = new StringBuilder();
        foreach (var (category, _, bytes) in rows)
            sb.Append(category.PadRight(w)).Append("  ").Append(bytes.ToString(CultureInfo.InvariantCulture).PadLeft(15))
              .Append("  ").Append(MemoryPlan.FormatBytes(bytes)).Append('\n');
        return sb.ToString();
    }

    /// <summary>A JSON string literal (quotes and backslashes escaped).</summary>
    public static string Str(string s) => "\"" + s.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";

    /// <summary>A JSON string of the value's name in lower case ("bf16", "gpu", "qlora").</summary>
    public static string Lower<T>(T value) where T : struct, Enum => Str(value.ToString().ToLowerInvariant());

    /// <summary>Adds <c>"key": value</c> with <paramref name="value"/> already JSON text.</summary>
    public PlanText Field(string key, string value)
    {
        _sb.Append("  \"").Append(key).Append("\": ").Append(value).Append(",\n");
        return this;
    }

    /// <summary>Adds <c>"key": n</c>.</summary>
    public PlanText Field(string key, long value) => Field(key, value.ToString(CultureInfo.InvariantCulture));

    /// <summary>Adds <c>"key": true|false</c>.</summary>
    public PlanText Field(string key, bool value) => Field(key, value ? "true" : "false");

    /// <summary>The memory pool's reservations for the plan at <paramref name="alignment"/> ("pool_*").</summary>
    public PlanText Pool(int alignment, long persistent, long ropeTables, long transient) =>
        Field("pool_alignment", alignment).Field("pool_persistent_bytes", persistent)
            .Field("pool_rope_tables_bytes", ropeTables).Field("pool_transient_bytes", transient);

    /// <summary>The object, closed by <c>"total_bytes"</c>.</summary>
    public string Finish(long totalBytes)
    {
        _sb.Append("  \"total_bytes\": ").Append(totalBytes.ToString(CultureInfo.InvariantCulture)).Append("\n}");
        return _sb.ToString();
    }
}
