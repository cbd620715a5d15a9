using System.Text;

namespace NativePeft.Planning;

/// <summary>The one wording of "a plan does not fit", shared by the training and the inference plans.</summary>
public static class PlanFit
{
    /// <summary>
    /// "exceeds BUDGET: plan total X; options that would make it fit: --flags (Y), …" with the alternatives whose totals
    /// fit <paramref name="deviceBytes"/>, or, when none does, every alternative's total and that none fits.
    /// </summary>
    public static string Message(long planTotal, IEnumerable<(string Flags, long Total)> alternatives, long deviceBytes, string budget)
    {
        var all = alternatives.ToList();
        var fitting = all.Where(a => a.Total <= deviceBytes).ToList();
        var sb = new StringBuilder();
        sb.Append($"exceeds {budget}: plan total {MemoryPlan.FormatBytes(planTotal)}; ");
        if (fitting.Count > 0)
            sb.Append("options that would make it fit: ").Append(string.Join(", ", fitting.Select(a => $"{a.Flags} ({MemoryPlan.FormatBytes(a.Total)})")));
        else if (all.Count > 0)
            sb.Append("no option makes it fit (").Append(string.Join(", ", all.Select(a => $"{a.Flags}: {MemoryPlan.FormatBytes(a.Total)}")))
              .Append("); use a smaller model or a larger device");
        else sb.Append("use a smaller model or a larger device");
        return sb.ToString();
    }
}
