using System.CommandLine;
using System.CommandLine.Help;
using System.Text;
using System.Text.Json;
using NativePeft.IO;
using YamlDotNet.Core;
using YamlDotNet.RepresentationModel;

namespace NativePeft.Cli;

/// <summary>
/// <c>--config FILE</c> for every command: a JSON (.json) or YAML (.yaml, .yml) file holding a flat map of option names
/// (without the dashes: <c>lr: 2e-4</c>, <c>method: qlora</c>, <c>grad_accum</c> or <c>grad-accum</c>), expanded into
/// command-line arguments before parsing, so the command is parsed and checked exactly as if the user had typed them.
/// Values: a string or number (passed as written: <c>2e-4</c> stays 2e-4), a boolean (<c>true</c>/<c>false</c>), a
/// list (<c>[q_proj, v_proj]</c>: joined with commas for a single-value option such as --targets, one value each for
/// a multi-value option), or null/empty (ignored, as if absent). An option given on the command line overrides the
/// file: the file's value is dropped (System.CommandLine rejects a single-value option given twice, so "the last one
/// wins" would not work). The file's arguments go right after the command name, before the real ones.
/// <para>
/// Errors (exit 2, one message naming the file): unreadable or malformed file (with its line), a key that is not an
/// option of the command ("unrecognized option"), a nested map, a key given twice, --config given twice or without a
/// file. Relative paths in the file (model: ./base) are relative to the working directory, as on the command line.
/// </para>
/// </summary>
public static class ConfigFile
{
    public const string OptionName = "--config";

    /// <summary>A value of the file: its scalars (one for a scalar, any number for a list) and the line it is on.</summary>
    public sealed record Entry(string Key, IReadOnlyList<string> Values, bool IsList, int Line);

    /// <summary>
    /// Adds the (help-only) recursive --config option to <paramref name="root"/> (the top command) and returns <paramref name="args"/> with
    /// <c>--config FILE</c> (or <c>--config=FILE</c>) replaced by the file's options. Without --config, returns
    /// <paramref name="args"/> unchanged.
    /// </summary>
    /// <exception cref="CliException">A bad file or key (exit code 2).</exception>
    public static string[] Expand(Command root, string[] args)
    {
        ArgumentNullException.ThrowIfNull(root);
        ArgumentNullException.ThrowIfNull(args);
        if (!root.Options.Any(o => o.Name == OptionName))
            root.Options.Add(new Option<FileInfo>(OptionName)
            {
                Description = "read options from a JSON or YAML file (flat map: lr: 2e-4, targets: [q_proj, v_proj]); flags on the command line override it",
                Recursive = true,
            });

        string? file = null;
        var rest = new List<string>(args.Length);
        for (int i = 0; i < args.Length; i++)
        {
            string a = args[i];
            if (a == "--") { rest.AddRange(args[i..]); break; }
            string? value = null;
            if (a == OptionName)
            {
                if (i + 1 >= args.Length || args[i + 1].StartsWith("--", StringComparison.Ordinal))
                    throw new CliException($"{OptionName}: expected a file (.json, .yaml or .yml)", 2);
                value = args[++i];
            }
            else if (a.StartsWith(OptionName + "=", StringComparison.Ordinal) || a.StartsWith(OptionName + ":", StringComparison.Ordinal))
            {
                value = a[(OptionName.Length + 1)..];
            }
            else
            {
                rest.Add(a);
                continue;
            }
            if (file is not null) throw new CliException($"{OptionName} given twice ({file}, {value}): give one file", 2);
            file = value;
        }
        if (file is null) return args;

        var entries = Read(file);
        // What the command line alone says: which command, and which of its options it already gives.
        var parsed = root.Parse(rest);
        var options = AllOptions(parsed).ToList();
        var expanded = new List<string>();
        foreach (var e in entries)
        {
            if (e.Values.Count == 0) continue;
            var option = Find(options, e.Key);
            if (option is null || option.Name == OptionName || option is HelpOption || option is VersionOption)
            {
                string known = string.Join(", ", options.Where(o => !o.Hidden && o.Name != OptionName && o is not HelpOption and not VersionOption)
                    .Select(o => o.Name.TrimStart('-')));
                throw new CliException(
                    $"{file}:{e.Line}: unrecognized option '{e.Key}' for '{CommandPath(parsed)}'" +
                    (known.Length > 0 ? $" (its options: {known})" : " (give the command first, e.g. nativepeft train --config FILE)"), 2);
            }
            if (parsed.GetResult(option) is { Implicit: false }) continue; // the command line overrides the file
            if (option.Arity.MaximumNumberOfValues > 1)
            {
                foreach (var v in e.Values) expanded.AddRange(Token(option, v));
            }
            else
            {
                if (e.IsList && (option.ValueType == typeof(bool) || option.ValueType == typeof(bool?)))
                    throw new CliException($"{file}:{e.Line}: option '{e.Key}' is a switch; give true or false, not a list", 2);
                expanded.AddRange(Token(option, string.Join(',', e.Values)));
            }
        }
        // after the command's own tokens (the leading words: subcommand names and positional arguments)
        int at = 0;
        while (at < rest.Count && !rest[at].StartsWith('-')) at++;
        rest.InsertRange(at, expanded);
        return [.. rest];
    }

    private static IEnumerable<string> Token(Option option, string value) =>
        value.StartsWith('@') ? [$"{option.Name}={value}"] : [option.Name, value];

    private static string CommandPath(ParseResult parsed)
    {
        var names = new List<string>();
        for (var r = parsed.CommandResult; r is not null; r = r.Parent as System.CommandLine.Parsing.CommandResult)
            names.Add(r.Parent is null && r.Command is RootCommand ? Program.Name : r.Command.Name);
        names.Reverse();
        return string.Join(' ', names);
    }

    /// <summary>The options of the parsed command and the recursive ones of its parents.</summary>
    private static IEnumerable<Option> AllOptions(ParseResult parsed)
    {
        var seen = new HashSet<Option>();
        bool own = true;
        for (var r = parsed.CommandResult; r is not null; r = r.Parent as System.CommandLine.Parsing.CommandResult)
        {
            foreach (var o in r.Command.Options)
                if ((own || o.Recursive) && seen.Add(o)) yield return o;
            own = false;
        }
    }

    /// <summary>The option named <paramref name="key"/> (with or without dashes; '_' also matches '-'), or null.</summary>
    private static Option? Find(List<Option> options, string key)
    {
        string bare = key.TrimStart('-');
        if (bare.Length == 0) return null;
        foreach (string candidate in new[] { bare, bare.Replace('_', '-') }.Distinct())
        {
            string name = "--" + candidate;
            var o = options.FirstOrDefault(o => o.Name == name || o.Aliases.Contains(name));
            if (o is not null) return o;
        }
        return null;
    }

    /// <summary>Reads a config file (by extension) into entries, in file order.</summary>
    /// <exception cref="CliException">Unreadable, malformed, not a flat map, or a key twice (exit code 2).</exception>
    public static IReadOnlyList<Entry> Read(string file)
    {
        string ext = Path.GetExtension(file).ToLowerInvariant();
        if (ext is not (".json" or ".yaml" or ".yml"))
            throw new CliException($"{OptionName} {file}: expected a .json, .yaml or .yml file", 2);
        byte[] raw;
        try
        {
            raw = TextInput.ReadFile(file, Limits.MaxJsonFileBytes, (problem, inner) => new CliException($"{OptionName} {file}: {problem}", 2, inner));
        }
        catch (Exception e) when (e is ArgumentException or NotSupportedException)
        {
            throw new CliException($"{OptionName} {file}: {e.Message}", 2, e);
        }
        // Strict UTF-8 (and, in JSON, no lone surrogate escapes): the problem's line, as the parse errors below.
        if (TextInput.Utf8Problem(raw, json: ext == ".json", out int badLine) is { } bad)
            throw new CliException($"{file}:{badLine}: {bad}", 2);
        string text = TextInput.DecodeUtf8(raw, (problem, inner) => new CliException($"{file}: {problem}", 2, inner));
        var entries = ext == ".json" ? ReadJson(file, text) : ReadYaml(file, text);
        var seen = new Dictionary<string, Entry>(StringComparer.Ordinal);
        foreach (var e in entries)
        {
            string norm = e.Key.TrimStart('-').Replace('_', '-');
            if (!seen.TryAdd(norm, e))
                throw new CliException($"{file}:{e.Line}: '{e.Key}' is given twice (also on line {seen[norm].Line})", 2);
        }
        return entries;
    }

    private static List<Entry> ReadJson(string file, string text)
    {
        var entries = new List<Entry>();
        var lineStarts = LineStarts(text);
        var bytes = Encoding.UTF8.GetBytes(text);
        var reader = new Utf8JsonReader(bytes, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
        int Line(long byteOffset) => LineOf(lineStarts, Encoding.UTF8.GetCharCount(bytes, 0, (int)byteOffset));
        try
        {
            if (!reader.Read()) throw new CliException($"{file}:1: empty file (expected a JSON object of options)", 2);
            if (reader.TokenType != JsonTokenType.StartObject)
                throw new CliException($"{file}:{Line(reader.TokenStartIndex)}: expected a JSON object of options ({{\"lr\": 2e-4, …}})", 2);
            while (true)
            {
                reader.Read();
                if (reader.TokenType == JsonTokenType.EndObject) break;
                string key = reader.GetString()!;
                int line = Line(reader.TokenStartIndex);
                reader.Read();
                switch (reader.TokenType)
                {
                    case JsonTokenType.Null: entries.Add(new Entry(key, [], false, line)); break;
                    case JsonTokenType.StartArray:
                        var values = new List<string>();
                        while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
                        {
                            if (JsonScalar(ref reader) is not { } v)
                                throw new CliException($"{file}:{Line(reader.TokenStartIndex)}: '{key}': a list holds strings, numbers or booleans only", 2);
                            values.Add(v);
                        }
                        entries.Add(new Entry(key, values, true, line));
                        break;
                    case JsonTokenType.StartObject:
                        throw new CliException($"{file}:{line}: '{key}': expected a value or a list, not an object (the file is a flat map of options)", 2);
                    default:
                        entries.Add(new Entry(key, [JsonScalar(ref reader)!], false, line));
                        break;
                }
            }
            if (reader.Read())
                throw new CliException($"{file}:{Line(reader.TokenStartIndex)}: unexpected content after the JSON object", 2);
        }
        catch (JsonException e)
        {
            // JsonException.LineNumber is 0-based; its message ends with "LineNumber: … | BytePositionInLine: …."
            long line = (e.LineNumber ?? 0) + 1;
            string msg = e.Message;
            int cut = msg.IndexOf(" LineNumber:", StringComparison.Ordinal);
            if (cut > 0) msg = msg[..cut].TrimEnd();
            throw new CliException($"{file}:{line}: invalid JSON: {msg}", 2, e);
        }
        return entries;
    }

    private static string? JsonScalar(ref Utf8JsonReader reader) => reader.TokenType switch
    {
        JsonTokenType.String => reader.GetString(),
        JsonTokenType.Number => Encoding.UTF8.GetString(reader.ValueSpan), // one contiguous buffer: never a ValueSequence,
        JsonTokenType.True => "true",
        JsonTokenType.False => "false",
        _ => null,
    };

    private static List<Entry> ReadYaml(string file, string text)
    {
        var stream = new YamlStream();
        var parser = new Parser(new StringReader(text));
        try
        {
            stream.Load(parser);
        }
        catch (YamlException e)
        {
            string msg = (e.InnerException as YamlException ?? e).Message;
            throw new CliException($"{file}:{e.Start.Line}: invalid YAML: {msg}", 2, e);
        }
        catch (InvalidOperationException e)
        {
            // YamlDotNet 16 throws this (not a YamlException) for some unterminated flow collections, e.g. "[a, b" + newline
            long line = parser.Current?.End.Line ?? 1;
            throw new CliException($"{file}:{line}: invalid YAML: a list or map ('[' or '{{') that starts here is not closed", 2, e);
        }
        if (stream.Documents.Count == 0) return [];
        if (stream.Documents.Count > 1)
            throw new CliException($"{file}:{stream.Documents[1].RootNode.Start.Line}: expected one YAML document, found {stream.Documents.Count}", 2);
        var root = stream.Documents[0].RootNode;
        if (root is YamlScalarNode rootScalar && YamlScalar(rootScalar) is null) return []; // an empty file
        if (root is not YamlMappingNode map)
            throw new CliException($"{file}:{root.Start.Line}: expected a map of options (lr: 2e-4, method: qlora, …)", 2);
        var entries = new List<Entry>();
        foreach (var (keyNode, valueNode) in map.Children)
        {
            int line = (int)keyNode.Start.Line;
            if (keyNode is not YamlScalarNode { Value: { Length: > 0 } key })
                throw new CliException($"{file}:{line}: expected an option name as the key", 2);
            switch (valueNode)
            {
                case YamlScalarNode s:
                    entries.Add(YamlScalar(s) is { } v ? new Entry(key, [v], false, line) : new Entry(key, [], false, line));
                    break;
                case YamlSequenceNode seq:
                    var values = new List<string>();
                    foreach (var item in seq.Children)
                    {
                        if (item is not YamlScalarNode si || YamlScalar(si) is not { } itemValue)
                            throw new CliException($"{file}:{item.Start.Line}: '{key}': a list holds strings, numbers or booleans only", 2);
                        values.Add(itemValue);
                    }
                    entries.Add(new Entry(key, values, true, line));
                    break;
                default:
                    throw new CliException($"{file}:{line}: '{key}': expected a value or a list, not a map (the file is a flat map of options)", 2);
            }
        }
        return entries;
    }

    /// <summary>A scalar's text (YAML 1.2 core booleans as true/false), or null for null/~/empty.</summary>
    private static string? YamlScalar(YamlScalarNode s)
    {
        string? v = s.Value;
        if (s.Style is ScalarStyle.SingleQuoted or ScalarStyle.DoubleQuoted) return v;
        if (v is null or "" or "~" or "null" or "Null" or "NULL") return null;
        if (v is "true" or "True" or "TRUE") return "true";
        if (v is "false" or "False" or "FALSE") return "false";
        return v;
    }

    private static List<int> LineStarts(string text)
    {
        var starts = new List<int> { 0 };
        for (int i = 0; i < text.Length; i++)
            if (text[i] == '\n') starts.Add(i + 1);
        return starts;
    }

    private static int LineOf(List<int> starts, int charOffset)
    {
        int i = starts.BinarySearch(charOffset);
        return (i >= 0 ? i : ~i - 1) + 1;
    }
}
