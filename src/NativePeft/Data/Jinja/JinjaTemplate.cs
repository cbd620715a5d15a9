using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;

namespace NativePeft.Data.Jinja;

/// <summary>
/// The bounds a template evaluation runs under; exceeding one throws a <see cref="JinjaException"/> naming it.
/// </summary>
public sealed record JinjaLimits
{
    /// <summary>Most characters of output, and of any string or list a template builds (1,000,000).</summary>
    public int MaxOutputChars { get; init; } = 1_000_000;
    /// <summary>Most evaluation steps (expression nodes, statements and loop iterations together: 1,000,000).</summary>
    public long MaxSteps { get; init; } = 1_000_000;
    /// <summary>Deepest nesting of blocks and expressions (64).</summary>
    public int MaxDepth { get; init; } = 64;
    /// <summary>Wall-clock time of one render (2 s).</summary>
    public TimeSpan MaxTime { get; init; } = TimeSpan.FromSeconds(2);

    public static JinjaLimits Default { get; } = new();
}

/// <summary>A template could not be parsed or evaluated; the message names the template, the line and the construct or limit.</summary>
public sealed class JinjaException(string message) : Exception(message);

/// <summary>
/// A small Jinja2 subset, interpreted as data: no I/O, no reflection, no host objects beyond the values passed in
/// (strings, numbers, bools, none, lists, dicts), bounded in output, steps, nesting and time (<see cref="JinjaLimits"/>).
/// Whitespace follows Hugging Face transformers' chat-template environment: trim_blocks and lstrip_blocks on, one
/// trailing newline of the template dropped, <c>-</c> / <c>+</c> whitespace control. Supported: <c>{{ }}</c>,
/// <c>{# #}</c>; if/elif/else, for (tuple targets, <c>if</c> filter, else, loop.index/index0/revindex/revindex0/first/last/length),
/// break/continue, set (also <c>ns.attr</c> of a namespace()), generation (rendered as its body); literals, lists,
/// dicts, attribute/subscript/slice access, + - * / // % ** ~, comparisons, in / not in, and/or/not, <c>x if c else y</c>,
/// tests defined/undefined/none/string/number/integer/float/boolean/mapping/sequence/iterable/true/false/even/odd,
/// filters trim/upper/lower/capitalize/title/length/count/default/tojson/join/first/last/string/int/float/list/reverse/replace/items,
/// functions range/raise_exception/namespace, methods strip/lstrip/rstrip/startswith/endswith/upper/lower/title/split/replace
/// (strings) and items/keys/values/get (dicts). Anything else (macro, call, include, import, extends, block, filter,
/// with, raw, other filters, tests or methods) is a <see cref="JinjaException"/> naming the construct and the line.
/// </summary>
public sealed class JinjaTemplate
{
    private readonly List<Stmt> _body;
    private readonly JinjaLimits _limits;

    /// <summary>What messages call the template ("chat template of model/tokenizer_config.json").</summary>
    public string Name { get; }

    private JinjaTemplate(string name, List<Stmt> body, JinjaLimits limits) { Name = name; _body = body; _limits = limits; }

    /// <summary>Parses <paramref name="source"/>; syntax errors and unsupported constructs throw naming <paramref name="name"/> and the line.</summary>
    public static JinjaTemplate Parse(string source, string name = "template", JinjaLimits? limits = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        limits ??= JinjaLimits.Default;
        var pieces = Lexer.Lex(source, name);
        return new JinjaTemplate(name, new Parser(pieces, name, limits.MaxDepth).ParseTemplate(), limits);
    }

    /// <summary>Renders with <paramref name="variables"/> (values: string, long/int, double, bool, null, lists, string-keyed dicts, <see cref="JsonElement"/>).</summary>
    public string Render(IReadOnlyDictionary<string, object?> variables)
    {
        ArgumentNullException.ThrowIfNull(variables);
        var globals = new Dictionary<string, object?>(StringComparer.Ordinal);
        foreach (var (k, v) in variables) globals[k] = Values.Import(v);
        var ctx = new Context(Name, _limits, globals);
        ctx.Exec(_body);
        return ctx.Output.ToString();
    }

    // ---------------------------------------------------------------- lexer

    internal enum TokKind { Name, String, Int, Float, Op }
    internal readonly record struct Tok(TokKind Kind, string Text, int Line, long IntValue = 0, double FloatValue = 0);
    internal enum PieceKind { Text, Output, Statement }
    internal sealed class Piece(PieceKind kind, int line)
    {
        public PieceKind Kind = kind;
        public int Line = line;
        public string Text = "";
        public List<Tok> Toks = [];
    }

    private static class Lexer
    {
        public static List<Piece> Lex(string src, string name)
        {
            if (src.EndsWith("\r\n", StringComparison.Ordinal)) src = src[..^2];
            else if (src.EndsWith('\n')) src = src[..^1];
            var pieces = new List<Piece>();
            // per piece: strip whitespace before (from '-' of the opening), after (closing '-'), lstrip/trim eligibility
            var stripBefore = new List<bool>(); var stripAfter = new List<bool>(); var block = new List<bool>(); var plus = new List<bool>();
            int i = 0, line = 1;
            void AddText(string t, int l) { pieces.Add(new Piece(PieceKind.Text, l) { Text = t }); stripBefore.Add(false); stripAfter.Add(false); block.Add(false); plus.Add(false); }
            while (i < src.Length)
            {
                int open = IndexOfTag(src, i);
                if (open < 0) { AddText(src[i..], line); break; }
                if (open > i) { AddText(src[i..open], line); line += Count(src, i, open); }
                char kind = src[open + 1];
                int j = open + 2;
                bool sb = false, pl = false;
                if (j < src.Length && src[j] == '-') { sb = true; j++; }
                else if (j < src.Length && src[j] == '+') { pl = true; j++; }
                int tagLine = line;
                if (kind == '#')
                {
                    int close = src.IndexOf("#}", j, StringComparison.Ordinal);
                    if (close < 0) throw new JinjaException($"{name} line {tagLine}: a comment {{# is not closed");
                    bool sa = close > j && src[close - 1] == '-';
                    line += Count(src, open, close + 2);
                    pieces.Add(new Piece(PieceKind.Statement, tagLine)); // an empty statement: a comment
                    stripBefore.Add(sb); stripAfter.Add(sa); block.Add(true); plus.Add(pl);
                    i = close + 2;
                    continue;
                }
                var piece = new Piece(kind == '{' ? PieceKind.Output : PieceKind.Statement, tagLine);
                string end = kind == '{' ? "}}" : "%}";
                bool closed = false, sa2 = false;
                while (j < src.Length)
                {
                    char c = src[j];
                    if (c == '\n') { line++; j++; continue; }
                    if (char.IsWhiteSpace(c)) { j++; continue; }
                    if (c == '-' && string.CompareOrdinal(src, j + 1, end, 0, 2) == 0) { sa2 = true; j += 3; closed = true; break; }
                    if (string.CompareOrdinal(src, j, end, 0, 2) == 0) { j += 2; closed = true; break; }
                    if (char.IsLetter(c) || c == '_')
                    {
                        int s = j; while (j < src.Length && (char.IsLetterOrDigit(src[j]) || src[j] == '_')) j++;
                        piece.Toks.Add(new Tok(TokKind.Name, src[s..j], line));
                    }
                    else if (char.IsAsciiDigit(c))
                    {
                        int s = j; while (j < src.Length && (char.IsAsciiDigit(src[j]) || src[j] == '_')) j++;
                        bool isFloat = false;
                        if (j + 1 < src.Length && src[j] == '.' && char.IsAsciiDigit(src[j + 1]))
                        {
                            isFloat = true; j++;
                            while (j < src.Length && char.IsAsciiDigit(src[j])) j++;
                        }
                        string num = src[s..j].Replace("_", "", StringComparison.Ordinal);
                        if (isFloat) piece.Toks.Add(new Tok(TokKind.Float, num, line, 0, double.Parse(num, CultureInfo.InvariantCulture)));
                        else if (long.TryParse(num, NumberStyles.None, CultureInfo.InvariantCulture, out long v)) piece.Toks.Add(new Tok(TokKind.Int, num, line, v));
                        else throw new JinjaException($"{name} line {line}: the integer {num} is too large");
                    }
                    else if (c is '\'' or '"')
                    {
                        var sbuf = new StringBuilder();
                        int s = j++;
                        bool done = false;
                        while (j < src.Length)
                        {
                            char d = src[j++];
                            if (d == c) { done = true; break; }
                            if (d == '\n') line++;
                            if (d != '\\' || j >= src.Length) { sbuf.Append(d); continue; }
                            char e = src[j++];
                            switch (e)
                            {
                                case 'n': sbuf.Append('\n'); break;
                                case 't': sbuf.Append('\t'); break;
                                case 'r': sbuf.Append('\r'); break;
                                case '\\': sbuf.Append('\\'); break;
                                case '\'': sbuf.Append('\''); break;
                                case '"': sbuf.Append('"'); break;
                                case '0': sbuf.Append('\0'); break;
                                case 'u' when j + 4 <= src.Length && int.TryParse(src.AsSpan(j, 4), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out int u):
                                    sbuf.Append((char)u); j += 4; break;
                                case '\n': line++; break;
                                default: sbuf.Append('\\').Append(e); break;
                            }
                        }
                        if (!done) throw new JinjaException($"{name} line {line}: a string starting {src[s..Math.Min(s + 20, src.Length)]} is not closed");
                        piece.Toks.Add(new Tok(TokKind.String, sbuf.ToString(), line));
                    }
                    else
                    {
                        string two = j + 1 < src.Length ? src.Substring(j, 2) : "";
                        if (two is "//" or "**" or "==" or "!=" or "<=" or ">=") { piece.Toks.Add(new Tok(TokKind.Op, two, line)); j += 2; }
                        else if ("()[]{},.:|~+-*/%<>=".Contains(c)) { piece.Toks.Add(new Tok(TokKind.Op, c.ToString(), line)); j++; }
                        else throw new JinjaException($"{name} line {line}: unexpected character '{c}'");
                    }
                }
                if (!closed) throw new JinjaException($"{name} line {tagLine}: {(kind == '{' ? "{{" : "{%")} is not closed by {end}");
                pieces.Add(piece);
                stripBefore.Add(sb); stripAfter.Add(sa2); block.Add(kind == '%'); plus.Add(pl);
                i = j;
            }
            // Whitespace control: '-' strips all white space on that side; block and comment tags also lstrip
            // (spaces/tabs from the line start) and trim (the first newline after the tag), as transformers sets.
            for (int k = 0; k < pieces.Count; k++)
            {
                if (pieces[k].Kind == PieceKind.Text) continue;
                Piece? prev = k > 0 && pieces[k - 1].Kind == PieceKind.Text ? pieces[k - 1] : null;
                Piece? next = k + 1 < pieces.Count && pieces[k + 1].Kind == PieceKind.Text ? pieces[k + 1] : null;
                if (prev is not null)
                {
                    if (stripBefore[k]) prev.Text = prev.Text.TrimEnd();
                    else if (block[k] && !plus[k])
                    {
                        int nl = prev.Text.LastIndexOf('\n');
                        string tail = prev.Text[(nl + 1)..];
                        bool atLineStart = nl >= 0 || k == 1;
                        if (atLineStart && tail.All(ch => ch is ' ' or '\t')) prev.Text = prev.Text[..(nl + 1)];
                    }
                }
                if (next is not null)
                {
                    if (stripAfter[k]) next.Text = next.Text.TrimStart();
                    else if (block[k])
                    {
                        if (next.Text.StartsWith('\n')) next.Text = next.Text[1..];
                        else if (next.Text.StartsWith("\r\n", StringComparison.Ordinal)) next.Text = next.Text[2..];
                    }
                }
            }
            // A comment is an empty statement piece: drop it now that its whitespace effects are applied.
            pieces.RemoveAll(p => p.Kind == PieceKind.Statement && p.Toks.Count == 0);
            return pieces;
        }

        private static int IndexOfTag(string s, int from)
        {
            for (int k = from; k + 1 < s.Length; k++)
                if (s[k] == '{' && s[k + 1] is '{' or '%' or '#') return k;
            return -1;
        }

        private static int Count(string s, int from, int to)
        {
            int n = 0;
            for (int k = from; k < to && k < s.Length; k++) if (s[k] == '\n') n++;
            return n;
        }
    }

    // ---------------------------------------------------------------- AST

    internal abstract class Stmt(int line) { public readonly int Line = line; }
    internal sealed class TextStmt(int line, string text) : Stmt(line) { public readonly string Text = text; }
    internal sealed class OutputStmt(int line, Expr e) : Stmt(line) { public readonly Expr E = e; }
    internal sealed class IfStmt(int line, List<(Expr Cond, List<Stmt> Body)> branches, List<Stmt>? otherwise) : Stmt(line)
    {
        public readonly List<(Expr Cond, List<Stmt> Body)> Branches = branches;
        public readonly List<Stmt>? Else = otherwise;
    }
    internal sealed class ForStmt(int line, List<string> targets, Expr iter, Expr? filter, List<Stmt> body, List<Stmt>? otherwise) : Stmt(line)
    {
        public readonly List<string> Targets = targets;
        public readonly Expr Iter = iter;
        public readonly Expr? Filter = filter;
        public readonly List<Stmt> Body = body;
        public readonly List<Stmt>? Else = otherwise;
    }
    internal sealed class SetStmt(int line, string target, string? attr, Expr value) : Stmt(line)
    {
        public readonly string Target = target;
        public readonly string? Attr = attr;
        public readonly Expr Value = value;
    }
    internal sealed class LoopControlStmt(int line, bool isBreak) : Stmt(line) { public readonly bool IsBreak = isBreak; }
    internal sealed class BlockStmt(int line, List<Stmt> body) : Stmt(line) { public readonly List<Stmt> Body = body; }

    internal abstract class Expr(int line) { public readonly int Line = line; }
    internal sealed class Lit(int line, object? value) : Expr(line) { public readonly object? Value = value; }
    internal sealed class NameExpr(int line, string name) : Expr(line) { public readonly string Name = name; }
    internal sealed class ListExpr(int line, List<Expr> items) : Expr(line) { public readonly List<Expr> Items = items; }
    internal sealed class DictExpr(int line, List<(Expr K, Expr V)> items) : Expr(line) { public readonly List<(Expr K, Expr V)> Items = items; }
    internal sealed class AttrExpr(int line, Expr obj, string name) : Expr(line) { public readonly Expr Obj = obj; public readonly string Name = name; }
    internal sealed class ItemExpr(int line, Expr obj, Expr index) : Expr(line) { public readonly Expr Obj = obj; public readonly Expr Index = index; }
    internal sealed class SliceExpr(int line, Expr obj, Expr? start, Expr? stop, Expr? step) : Expr(line)
    {
        public readonly Expr Obj = obj; public readonly Expr? Start = start, Stop = stop, Step = step;
    }
    internal sealed class Args(List<Expr> positional, List<(string Name, Expr Value)> named)
    {
        public readonly List<Expr> Positional = positional;
        public readonly List<(string Name, Expr Value)> Named = named;
    }
    internal sealed class CallExpr(int line, string function, Args args) : Expr(line) { public readonly string Function = function; public readonly Args A = args; }
    internal sealed class MethodExpr(int line, Expr obj, string method, Args args) : Expr(line) { public readonly Expr Obj = obj; public readonly string Method = method; public readonly Args A = args; }
    internal sealed class FilterExpr(int line, Expr value, string filter, Args args) : Expr(line) { public readonly Expr Value = value; public readonly string Filter = filter; public readonly Args A = args; }
    internal sealed class TestExpr(int line, Expr value, string test, bool negate) : Expr(line) { public readonly Expr Value = value; public readonly string Test = test; public readonly bool Negate = negate; }
    internal sealed class BinExpr(int line, string op, Expr l, Expr r) : Expr(line) { public readonly string Op = op; public readonly Expr L = l, R = r; }
    internal sealed class UnaryExpr(int line, string op, Expr e) : Expr(line) { public readonly string Op = op; public readonly Expr E = e; }
    internal sealed class CondExpr(int line, Expr cond, Expr then, Expr? otherwise) : Expr(line) { public readonly Expr Cond = cond, Then = then; public readonly Expr? Else = otherwise; }

    // ---------------------------------------------------------------- parser

    private static readonly HashSet<string> Unsupported =
        ["macro", "endmacro", "call", "endcall", "include", "import", "from", "extends", "block", "endblock", "filter", "endfilter",
         "with", "endwith", "raw", "endraw", "autoescape", "endautoescape", "trans", "endtrans", "do"];

    private sealed class Parser(List<Piece> pieces, string name, int maxDepth)
    {
        private int _p;          // current piece
        private List<Tok> _toks = [];
        private int _t;          // current token of the current tag
        private int _depth;
        private int _line;

        private JinjaException Error(string message, int? line = null) => new($"{name} line {line ?? _line}: {message}");

        private void Enter()
        {
            if (++_depth > maxDepth) throw Error($"nesting deeper than the limit of {maxDepth} levels");
        }

        public List<Stmt> ParseTemplate()
        {
            var (body, end) = ParseBlock([]);
            if (end is not null) throw Error($"unexpected {{% {end} %}}");
            return body;
        }

        /// <summary>Statements up to one of <paramref name="ends"/> (returned, its tag's tokens current) or the end (null).</summary>
        private (List<Stmt> Body, string? End) ParseBlock(string[] ends)
        {
            Enter();
            var body = new List<Stmt>();
            while (_p < pieces.Count)
            {
                var piece = pieces[_p++];
                _line = piece.Line;
                if (piece.Kind == PieceKind.Text) { if (piece.Text.Length > 0) body.Add(new TextStmt(piece.Line, piece.Text)); continue; }
                _toks = piece.Toks; _t = 0;
                if (piece.Kind == PieceKind.Output)
                {
                    var e = ParseExpression();
                    ExpectEnd("}}");
                    body.Add(new OutputStmt(piece.Line, e));
                    continue;
                }
                var kw = Next();
                if (kw.Kind != TokKind.Name) throw Error($"expected a statement name after {{%, found '{kw.Text}'");
                if (ends.Contains(kw.Text)) { _depth--; return (body, kw.Text); }
                body.Add(ParseStatement(kw));
            }
            _depth--;
            if (ends.Length > 0) throw Error($"the template ended before {{% {string.Join(" %} or {% ", ends)} %}}");
            return (body, null);
        }

        private Stmt ParseStatement(Tok kw)
        {
            int line = kw.Line;
            switch (kw.Text)
            {
                case "if":
                {
                    var branches = new List<(Expr, List<Stmt>)>();
                    List<Stmt>? otherwise = null;
                    var cond = ParseExpression(); ExpectEnd("%}");
                    while (true)
                    {
                        var (body, end) = ParseBlock(["elif", "else", "endif"]);
                        branches.Add((cond, body));
                        if (end == "elif") { cond = ParseExpression(); ExpectEnd("%}"); continue; }
                        if (end == "else")
                        {
                            ExpectEnd("%}");
                            var (eb, e2) = ParseBlock(["endif"]);
                            otherwise = eb; end = e2;
                        }
                        ExpectEnd("%}");
                        return new IfStmt(line, branches, otherwise);
                    }
                }
                case "for":
                {
                    var targets = new List<string> { ExpectName() };
                    while (PeekOp(",")) { _t++; targets.Add(ExpectName()); }
                    if (Next() is not { Kind: TokKind.Name, Text: "in" }) throw Error("expected 'in' in the for statement");
                    var iter = ParseOr();
                    Expr? filter = null;
                    if (PeekName("if")) { _t++; filter = ParseOr(); }
                    if (PeekName("recursive")) throw Error("unsupported construct: recursive for loops");
                    ExpectEnd("%}");
                    var (body, end) = ParseBlock(["else", "endfor"]);
                    List<Stmt>? otherwise = null;
                    if (end == "else") { ExpectEnd("%}"); (otherwise, _) = ParseBlock(["endfor"]); }
                    ExpectEnd("%}");
                    return new ForStmt(line, targets, iter, filter, body, otherwise);
                }
                case "set":
                {
                    string target = ExpectName();
                    string? attr = null;
                    if (PeekOp(".")) { _t++; attr = ExpectName(); }
                    if (PeekOp(",")) throw Error("unsupported construct: set with several targets");
                    if (!PeekOp("=")) throw Error("unsupported construct: set block ({% set x %}...{% endset %}); write {% set x = value %}");
                    _t++;
                    var value = ParseExpression();
                    ExpectEnd("%}");
                    return new SetStmt(line, target, attr, value);
                }
                case "break" or "continue":
                    ExpectEnd("%}");
                    return new LoopControlStmt(line, kw.Text == "break");
                case "generation":
                {
                    ExpectEnd("%}");
                    var (body, _) = ParseBlock(["endgeneration"]);
                    ExpectEnd("%}");
                    return new BlockStmt(line, body);
                }
                default:
                    if (Unsupported.Contains(kw.Text)) throw Error($"unsupported construct: {{% {kw.Text} %}}");
                    throw Error($"unknown or misplaced statement {{% {kw.Text} %}}");
            }
        }

        private Tok Next() => _t < _toks.Count ? _toks[_t++] : throw Error("the tag ends too early");
        private bool PeekOp(string op) => _t < _toks.Count && _toks[_t].Kind == TokKind.Op && _toks[_t].Text == op;
        private bool PeekName(string n) => _t < _toks.Count && _toks[_t].Kind == TokKind.Name && _toks[_t].Text == n;
        private bool PeekNames(string a, string b) =>
            _t + 1 < _toks.Count && _toks[_t].Kind == TokKind.Name && _toks[_t].Text == a && _toks[_t + 1].Kind == TokKind.Name && _toks[_t + 1].Text == b;
        private void ExpectOp(string op)
        {
            if (!PeekOp(op)) throw Error(_t < _toks.Count ? $"expected '{op}', found '{_toks[_t].Text}'" : $"expected '{op}' before the end of the tag");
            _t++;
        }
        private string ExpectName()
        {
            var t = Next();
            return t.Kind == TokKind.Name ? t.Text : throw Error($"expected a name, found '{t.Text}'");
        }
        private void ExpectEnd(string close)
        {
            if (_t < _toks.Count) throw Error($"expected {close}, found '{_toks[_t].Text}'");
        }

        private Expr ParseExpression()
        {
            Enter();
            var e = ParseOr();
            if (PeekName("if"))
            {
                int line = _toks[_t++].Line;
                var cond = ParseOr();
                Expr? otherwise = null;
                if (PeekName("else")) { _t++; otherwise = ParseExpression(); }
                e = new CondExpr(line, cond, e, otherwise);
            }
            _depth--;
            return e;
        }

        private Expr ParseOr()
        {
            var e = ParseAnd();
            while (PeekName("or")) { int l = _toks[_t++].Line; e = new BinExpr(l, "or", e, ParseAnd()); }
            return e;
        }

        private Expr ParseAnd()
        {
            var e = ParseNot();
            while (PeekName("and")) { int l = _toks[_t++].Line; e = new BinExpr(l, "and", e, ParseNot()); }
            return e;
        }

        private Expr ParseNot()
        {
            if (PeekName("not"))
            {
                int l = _toks[_t++].Line;
                Enter();
                var e = new UnaryExpr(l, "not", ParseNot());
                _depth--;
                return e;
            }
            return ParseCompare();
        }

        private Expr ParseCompare()
        {
            var e = ParseMath1();
            while (true)
            {
                if (_t >= _toks.Count) return e;
                var t = _toks[_t];
                if (t.Kind == TokKind.Op && t.Text is "==" or "!=" or "<" or "<=" or ">" or ">=") { _t++; e = new BinExpr(t.Line, t.Text, e, ParseMath1()); }
                else if (t.Kind == TokKind.Name && t.Text == "in") { _t++; e = new BinExpr(t.Line, "in", e, ParseMath1()); }
                else if (PeekNames("not", "in")) { _t += 2; e = new BinExpr(t.Line, "not in", e, ParseMath1()); }
                else return e;
            }
        }

        private Expr ParseMath1()
        {
            var e = ParseConcat();
            while (PeekOp("+") || PeekOp("-")) { var t = _toks[_t++]; e = new BinExpr(t.Line, t.Text, e, ParseConcat()); }
            return e;
        }

        private Expr ParseConcat()
        {
            var e = ParseMath2();
            while (PeekOp("~")) { var t = _toks[_t++]; e = new BinExpr(t.Line, "~", e, ParseMath2()); }
            return e;
        }

        private Expr ParseMath2()
        {
            var e = ParsePow();
            while (PeekOp("*") || PeekOp("/") || PeekOp("//") || PeekOp("%")) { var t = _toks[_t++]; e = new BinExpr(t.Line, t.Text, e, ParsePow()); }
            return e;
        }

        private Expr ParsePow()
        {
            var e = ParseUnary();
            while (PeekOp("**")) { var t = _toks[_t++]; e = new BinExpr(t.Line, "**", e, ParseUnary()); }
            return e;
        }

        private Expr ParseUnary()
        {
            if (PeekOp("-") || PeekOp("+"))
            {
                var t = _toks[_t++];
                Enter();
                var e = new UnaryExpr(t.Line, t.Text, ParseUnary());
                _depth--;
                return e;
            }
            return ParseFilters(ParsePostfix(ParsePrimary()));
        }

        private Expr ParsePrimary()
        {
            var t = Next();
            switch (t.Kind)
            {
                case TokKind.String:
                {
                    string s = t.Text;
                    while (_t < _toks.Count && _toks[_t].Kind == TokKind.String) s += _toks[_t++].Text; // adjacent literals
                    return new Lit(t.Line, s);
                }
                case TokKind.Int: return new Lit(t.Line, t.IntValue);
                case TokKind.Float: return new Lit(t.Line, t.FloatValue);
                case TokKind.Name:
                    switch (t.Text)
                    {
                        case "true" or "True": return new Lit(t.Line, true);
                        case "false" or "False": return new Lit(t.Line, false);
                        case "none" or "None": return new Lit(t.Line, null);
                    }
                    if (PeekOp("(")) return new CallExpr(t.Line, t.Text, ParseArgs());
                    return new NameExpr(t.Line, t.Text);
                case TokKind.Op when t.Text == "(":
                {
                    var e = ParseExpression();
                    if (PeekOp(",")) throw Error("unsupported construct: tuples; use a list [a, b]");
                    ExpectOp(")");
                    return e;
                }
                case TokKind.Op when t.Text == "[":
                {
                    var items = new List<Expr>();
                    while (!PeekOp("]"))
                    {
                        items.Add(ParseExpression());
                        if (!PeekOp(",")) break;
                        _t++;
                    }
                    ExpectOp("]");
                    return new ListExpr(t.Line, items);
                }
                case TokKind.Op when t.Text == "{":
                {
                    var items = new List<(Expr, Expr)>();
                    while (!PeekOp("}"))
                    {
                        var k = ParseExpression(); ExpectOp(":");
                        items.Add((k, ParseExpression()));
                        if (!PeekOp(",")) break;
                        _t++;
                    }
                    ExpectOp("}");
                    return new DictExpr(t.Line, items);
                }
                default:
                    throw Error($"unexpected '{t.Text}'");
            }
        }

        private Args ParseArgs()
        {
            ExpectOp("(");
            var pos = new List<Expr>();
            var named = new List<(string, Expr)>();
            while (!PeekOp(")"))
            {
                if (_t + 1 < _toks.Count && _toks[_t].Kind == TokKind.Name && _toks[_t + 1] is { Kind: TokKind.Op, Text: "=" })
                {
                    string n = _toks[_t].Text; _t += 2;
                    named.Add((n, ParseExpression()));
                }
                else if (PeekOp("*") || PeekOp("**")) throw Error("unsupported construct: *args / **kwargs");
                else pos.Add(ParseExpression());
                if (!PeekOp(",")) break;
                _t++;
            }
            ExpectOp(")");
            return new Args(pos, named);
        }

        private Expr ParsePostfix(Expr e)
        {
            int depth = 0;
            while (true)
            {
                if (PeekOp("."))
                {
                    var t = _toks[_t++];
                    var n = Next();
                    if (n.Kind == TokKind.Int) { e = new ItemExpr(t.Line, e, new Lit(t.Line, n.IntValue)); }
                    else if (n.Kind != TokKind.Name) throw Error($"expected an attribute name after '.', found '{n.Text}'");
                    else if (PeekOp("(")) e = new MethodExpr(t.Line, e, n.Text, ParseArgs());
                    else e = new AttrExpr(t.Line, e, n.Text);
                }
                else if (PeekOp("["))
                {
                    var t = _toks[_t++];
                    Expr? a = null, b = null, c = null;
                    bool slice = false;
                    if (!PeekOp(":")) a = ParseExpression();
                    if (PeekOp(":"))
                    {
                        slice = true; _t++;
                        if (!PeekOp("]") && !PeekOp(":")) b = ParseExpression();
                        if (PeekOp(":")) { _t++; if (!PeekOp("]")) c = ParseExpression(); }
                    }
                    ExpectOp("]");
                    e = slice ? new SliceExpr(t.Line, e, a, b, c) : new ItemExpr(t.Line, e, a!);
                }
                else if (PeekOp("(")) throw Error("unsupported construct: calling a value that is not a function name or a whitelisted method");
                else return e;
                if (++depth > maxDepth) throw Error($"nesting deeper than the limit of {maxDepth} levels");
            }
        }

        private Expr ParseFilters(Expr e)
        {
            while (true)
            {
                if (PeekOp("|"))
                {
                    var t = _toks[_t++];
                    string f = ExpectName();
                    var args = PeekOp("(") ? ParseArgs() : new Args([], []);
                    e = new FilterExpr(t.Line, e, f, args);
                }
                else if (PeekName("is"))
                {
                    var t = _toks[_t++];
                    bool neg = false;
                    if (PeekName("not")) { _t++; neg = true; }
                    var n = Next();
                    string test = n.Kind == TokKind.Name ? n.Text : throw Error($"expected a test name after 'is', found '{n.Text}'");
                    if (PeekOp("(")) throw Error($"unsupported construct: the test '{test}' with arguments");
                    e = new TestExpr(t.Line, e, test, neg);
                }
                else return e;
            }
        }
    }

    // ---------------------------------------------------------------- evaluation

    private sealed class Undefined
    {
        public static readonly Undefined Instance = new();
    }

    private enum Flow { Normal, Break, Continue }

    /// <summary>A namespace() object: the one mutable value, its attributes set with {% set ns.x = ... %}.</summary>
    private sealed class Namespace
    {
        public readonly Dictionary<string, object?> Attrs = new(StringComparer.Ordinal);
    }

    private static class Values
    {
        /// <summary>A host value as a template value: JSON, strings, numbers, bools, null, lists and dicts of them.</summary>
        public static object? Import(object? v) => v switch
        {
            null => null,
            string or bool or long or double => v,
            int i => (long)i,
            float f => (double)f,
            JsonElement e => FromJson(e),
            IReadOnlyDictionary<string, object?> d => d.ToDictionary(kv => kv.Key, kv => Import(kv.Value), StringComparer.Ordinal),
            IDictionary<string, object?> d => d.ToDictionary(kv => kv.Key, kv => Import(kv.Value), StringComparer.Ordinal),
            System.Collections.IEnumerable list => list.Cast<object?>().Select(Import).ToList(),
            _ => throw new ArgumentException($"a template variable of type {v.GetType().Name} is not a data value (string, number, bool, null, list, dict)"),
        };

        public static object? FromJson(JsonElement e) => e.ValueKind switch
        {
            JsonValueKind.String => e.GetString(),
            JsonValueKind.Number => e.TryGetInt64(out long l) ? (object)l : e.GetDouble(),
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            JsonValueKind.Null or JsonValueKind.Undefined => null,
            JsonValueKind.Array => e.EnumerateArray().Select(FromJson).ToList(),
            JsonValueKind.Object => ObjectFromJson(e),
            _ => null,
        };

        private static Dictionary<string, object?> ObjectFromJson(JsonElement e)
        {
            var d = new Dictionary<string, object?>(StringComparer.Ordinal);
            foreach (var p in e.EnumerateObject()) d[p.Name] = FromJson(p.Value);
            return d;
        }
    }

    private sealed class Context
    {
        private readonly string _name;
        private readonly JinjaLimits _limits;
        private readonly List<Dictionary<string, object?>> _scopes;
        private readonly Stopwatch _clock = Stopwatch.StartNew();
        private long _steps;
        private int _depth;
        private int _line; // of the expression evaluated last, for errors raised below it
        public readonly StringBuilder Output = new();

        public Context(string name, JinjaLimits limits, Dictionary<string, object?> globals)
        {
            _name = name; _limits = limits; _scopes = [globals];
        }

        private JinjaException Error(int line, string message) => new($"{_name} line {line}: {message}");

        /// <summary>Deepest expression evaluation (a long a ~ b ~ c chain nests without parentheses) and deepest value nesting.</summary>
        private const int MaxEvalDepth = 512;

        private static void GuardValueDepth(int level)
        {
            if (level > MaxEvalDepth) throw new JinjaException($"a value nested deeper than the limit of {MaxEvalDepth} levels");
        }

        private void Step(int line)
        {
            if (++_steps > _limits.MaxSteps)
                throw Error(line, $"the evaluation step limit ({_limits.MaxSteps:N0} steps) was exceeded");
            if ((_steps & 255) == 0 && _clock.Elapsed > _limits.MaxTime)
                throw Error(line, $"the time limit ({_limits.MaxTime.TotalSeconds:0.###} s) was exceeded");
        }

        private void CheckSize(int line, long size, string what)
        {
            if (size > _limits.MaxOutputChars)
                throw Error(line, $"the output limit ({_limits.MaxOutputChars:N0} characters) was exceeded by {what} of {size:N0}");
        }

        private void Write(int line, string s)
        {
            Output.Append(s);
            CheckSize(line, Output.Length, "the output");
        }

        public void Exec(List<Stmt> body) => ExecBlock(body);

        private Flow ExecBlock(List<Stmt> body)
        {
            if (++_depth > _limits.MaxDepth) throw Error(body.Count > 0 ? body[0].Line : 0, $"nesting deeper than the limit of {_limits.MaxDepth} levels");
            try
            {
                foreach (var s in body)
                {
                    var f = ExecStmt(s);
                    if (f != Flow.Normal) return f;
                }
                return Flow.Normal;
            }
            finally { _depth--; }
        }

        private Flow ExecStmt(Stmt s)
        {
            Step(s.Line);
            switch (s)
            {
                case TextStmt t: Write(t.Line, t.Text); return Flow.Normal;
                case OutputStmt o: Write(o.Line, ToText(Eval(o.E))); return Flow.Normal;
                case IfStmt i:
                    foreach (var (cond, body) in i.Branches)
                        if (Truthy(Eval(cond))) return ExecBlock(body);
                    return i.Else is null ? Flow.Normal : ExecBlock(i.Else);
                case ForStmt f: return ExecFor(f);
                case SetStmt set:
                {
                    var v = Eval(set.Value);
                    if (set.Attr is null) { _scopes[^1][set.Target] = v; return Flow.Normal; }
                    if (Lookup(set.Target) is not Namespace ns) throw Error(set.Line, $"{set.Target} is not a namespace(): cannot set {set.Target}.{set.Attr}");
                    ns.Attrs[set.Attr] = v;
                    return Flow.Normal;
                }
                case LoopControlStmt lc: return lc.IsBreak ? Flow.Break : Flow.Continue;
                case BlockStmt b: return ExecBlock(b.Body);
                default: throw Error(s.Line, "unknown statement");
            }
        }

        private Flow ExecFor(ForStmt f)
        {
            var source = Eval(f.Iter);
            List<object?> items = source switch
            {
                List<object?> l => l,
                string str => str.Select(c => (object?)c.ToString()).ToList(),
                Dictionary<string, object?> d => d.Keys.Select(k => (object?)k).ToList(),
                Undefined => [],
                null => throw Error(f.Line, "cannot loop over none"),
                _ => throw Error(f.Line, $"cannot loop over {TypeName(source)}"),
            };
            var scope = new Dictionary<string, object?>(StringComparer.Ordinal);
            _scopes.Add(scope);
            try
            {
                if (f.Filter is not null)
                {
                    var kept = new List<object?>();
                    foreach (var item in items)
                    {
                        Bind(f, scope, item);
                        if (Truthy(Eval(f.Filter))) kept.Add(item);
                    }
                    items = kept;
                }
                int n = items.Count;
                for (int i = 0; i < n; i++)
                {
                    Step(f.Line);
                    scope.Clear();
                    Bind(f, scope, items[i]);
                    scope["loop"] = new Dictionary<string, object?>(StringComparer.Ordinal)
                    {
                        ["index"] = (long)(i + 1), ["index0"] = (long)i, ["revindex"] = (long)(n - i), ["revindex0"] = (long)(n - i - 1),
                        ["first"] = i == 0, ["last"] = i == n - 1, ["length"] = (long)n,
                        ["previtem"] = i > 0 ? items[i - 1] : Undefined.Instance, ["nextitem"] = i + 1 < n ? items[i + 1] : Undefined.Instance,
                    };
                    if (ExecBlock(f.Body) == Flow.Break) break;
                }
                if (n == 0 && f.Else is not null) { scope.Clear(); ExecBlock(f.Else); }
            }
            finally { _scopes.RemoveAt(_scopes.Count - 1); }
            return Flow.Normal;
        }

        private void Bind(ForStmt f, Dictionary<string, object?> scope, object? item)
        {
            if (f.Targets.Count == 1) { scope[f.Targets[0]] = item; return; }
            if (item is not List<object?> parts || parts.Count != f.Targets.Count)
                throw Error(f.Line, $"cannot unpack {TypeName(item)} into {f.Targets.Count} loop variables");
            for (int k = 0; k < parts.Count; k++) scope[f.Targets[k]] = parts[k];
        }

        private object? Lookup(string name)
        {
            for (int k = _scopes.Count - 1; k >= 0; k--)
                if (_scopes[k].TryGetValue(name, out var v)) return v;
            return Undefined.Instance;
        }

        private object? Eval(Expr e)
        {
            Step(e.Line);
            _line = e.Line;
            if (++_depth > MaxEvalDepth) throw Error(e.Line, $"expression nesting deeper than the limit of {MaxEvalDepth} levels");
            try { return EvalCore(e); }
            finally { _depth--; }
        }

        private object? EvalCore(Expr e)
        {
            switch (e)
            {
                case Lit l: return l.Value;
                case NameExpr n: return Lookup(n.Name);
                case ListExpr l:
                {
                    var list = new List<object?>(l.Items.Count);
                    foreach (var x in l.Items) list.Add(Eval(x));
                    return list;
                }
                case DictExpr d:
                {
                    var dict = new Dictionary<string, object?>(StringComparer.Ordinal);
                    foreach (var (k, v) in d.Items)
                        dict[Eval(k) is string ks ? ks : throw Error(d.Line, "dict keys must be strings")] = Eval(v);
                    return dict;
                }
                case AttrExpr a: return GetItem(a.Line, Eval(a.Obj), a.Name, a.Name);
                case ItemExpr it: return GetItem(it.Line, Eval(it.Obj), Eval(it.Index), null);
                case SliceExpr s: return Slice(s);
                case CallExpr c: return Call(c);
                case MethodExpr m: return Method(m);
                case FilterExpr f: return Filter(f);
                case TestExpr t: return Test(t) != t.Negate;
                case CondExpr c: return Truthy(Eval(c.Cond)) ? Eval(c.Then) : c.Else is null ? Undefined.Instance : Eval(c.Else);
                case UnaryExpr u:
                {
                    var v = Eval(u.E);
                    return u.Op switch
                    {
                        "not" => !Truthy(v),
                        "-" => v switch { long x => (object)(-x), double x => -x, bool b => b ? -1L : 0L, _ => throw Error(u.Line, $"cannot negate {TypeName(v)}") },
                        _ => v is long or double ? v : throw Error(u.Line, $"unary + of {TypeName(v)}"),
                    };
                }
                case BinExpr b: return Binary(b);
                default: throw Error(e.Line, "unknown expression");
            }
        }

        private object? GetItem(int line, object? obj, object? key, string? attrName)
        {
            switch (obj)
            {
                case Undefined: throw Error(line, $"cannot read {(attrName is null ? $"[{Repr(key)}]" : "." + attrName)} of an undefined value");
                case null: throw Error(line, $"cannot read {(attrName is null ? $"[{Repr(key)}]" : "." + attrName)} of none");
                case Dictionary<string, object?> d:
                    return key is string k && d.TryGetValue(k, out var v) ? v : Undefined.Instance;
                case Namespace ns:
                    return key is string nk && ns.Attrs.TryGetValue(nk, out var nv) ? nv : Undefined.Instance;
                case List<object?> l when key is long or bool:
                {
                    long i = AsLong(key);
                    if (i < 0) i += l.Count;
                    return i >= 0 && i < l.Count ? l[(int)i] : Undefined.Instance;
                }
                case string s when key is long or bool:
                {
                    long i = AsLong(key);
                    if (i < 0) i += s.Length;
                    return i >= 0 && i < s.Length ? s[(int)i].ToString() : Undefined.Instance;
                }
                default: return Undefined.Instance;
            }
        }

        private object? Slice(SliceExpr s)
        {
            var obj = Eval(s.Obj);
            long? Opt(Expr? x) => x is null ? null : Eval(x) switch { null => null, long v => v, var v => throw Error(s.Line, $"slice indices must be integers, not {TypeName(v)}") };
            long? a = Opt(s.Start), b = Opt(s.Stop), st = Opt(s.Step);
            int n = obj switch { List<object?> l => l.Count, string str => str.Length, _ => throw Error(s.Line, $"cannot slice {TypeName(obj)}") };
            long step = st ?? 1;
            if (step == 0) throw Error(s.Line, "slice step cannot be zero");
            var idx = new List<int>();
            if (step > 0)
            {
                long lo = Clamp(a ?? 0, n, 0, n), hi = Clamp(b ?? n, n, 0, n);
                for (long i = lo; i < hi; i += step) idx.Add((int)i);
            }
            else
            {
                long lo = a is null ? n - 1 : Clamp(a.Value, n, -1, n - 1), hi = b is null ? -1 : Clamp(b.Value, n, -1, n - 1);
                for (long i = lo; i > hi; i += step) idx.Add((int)i);
            }
            if (obj is string str2) return string.Concat(idx.Select(i => str2[i]));
            var list = (List<object?>)obj!;
            return idx.Select(i => list[i]).ToList();
        }

        private static long Clamp(long i, int n, long lo, long hi)
        {
            if (i < 0) i += n;
            return Math.Clamp(i, lo, hi);
        }

        private object? Call(CallExpr c)
        {
            var args = c.A.Positional.Select(Eval).ToList();
            switch (c.Function)
            {
                case "raise_exception":
                    throw Error(c.Line, $"raise_exception: {(args.Count > 0 ? ToText(args[0]) : "")}");
                case "range":
                {
                    if (args.Count is < 1 or > 3 || args.Any(a => a is not long)) throw Error(c.Line, "range takes one to three integers");
                    long start = args.Count == 1 ? 0 : (long)args[0]!, stop = args.Count == 1 ? (long)args[0]! : (long)args[1]!, step = args.Count == 3 ? (long)args[2]! : 1;
                    if (step == 0) throw Error(c.Line, "range step cannot be zero");
                    long count = step > 0 ? Math.Max(0, (stop - start + step - 1) / step) : Math.Max(0, (start - stop - step - 1) / -step);
                    if (count > _limits.MaxSteps) throw Error(c.Line, $"the evaluation step limit ({_limits.MaxSteps:N0} steps) was exceeded: range of {count:N0} items");
                    var list = new List<object?>((int)count);
                    for (long k = 0; k < count; k++) list.Add(start + k * step);
                    return list;
                }
                case "namespace":
                {
                    var ns = new Namespace();
                    foreach (var (n, v) in c.A.Named) ns.Attrs[n] = Eval(v);
                    return ns;
                }
                default:
                    throw Error(c.Line, $"unsupported construct: the function {c.Function}() (supported: range, raise_exception, namespace)");
            }
        }

        private object? Method(MethodExpr m)
        {
            var obj = Eval(m.Obj);
            var args = m.A.Positional.Select(Eval).ToList();
            string? Arg(int i) => i < args.Count ? args[i] as string ?? (args[i] is null ? null : throw Error(m.Line, $".{m.Method}() expects a string argument")) : null;
            if (obj is string s)
            {
                switch (m.Method)
                {
                    case "strip": return Arg(0) is { } cs ? s.Trim(cs.ToCharArray()) : s.Trim();
                    case "lstrip": return Arg(0) is { } cl ? s.TrimStart(cl.ToCharArray()) : s.TrimStart();
                    case "rstrip": return Arg(0) is { } cr ? s.TrimEnd(cr.ToCharArray()) : s.TrimEnd();
                    case "startswith": return s.StartsWith(Arg(0) ?? "", StringComparison.Ordinal);
                    case "endswith": return s.EndsWith(Arg(0) ?? "", StringComparison.Ordinal);
                    case "upper": return s.ToUpperInvariant();
                    case "lower": return s.ToLowerInvariant();
                    case "title": return Title(s);
                    case "split":
                    {
                        string? sep = Arg(0);
                        var parts = sep is null ? s.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries) : s.Split(sep);
                        return parts.Select(p => (object?)p).ToList();
                    }
                    case "replace":
                    {
                        string from = Arg(0) ?? throw Error(m.Line, ".replace() needs two strings"), to = Arg(1) ?? "";
                        return Replace(m.Line, s, from, to);
                    }
                }
            }
            else if (obj is Dictionary<string, object?> d)
            {
                switch (m.Method)
                {
                    case "items": return d.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList();
                    case "keys": return d.Keys.Select(k => (object?)k).ToList();
                    case "values": return d.Values.ToList();
                    case "get": return args.Count > 0 && args[0] is string k && d.TryGetValue(k, out var v) ? v : args.Count > 1 ? args[1] : null;
                }
            }
            throw Error(m.Line, $"unsupported construct: the method .{m.Method}() on {TypeName(obj)} " +
                "(supported: strip, lstrip, rstrip, startswith, endswith, upper, lower, title, split, replace on strings; items, keys, values, get on dicts)");
        }

        private object? Filter(FilterExpr f)
        {
            var v = Eval(f.Value);
            var args = f.A.Positional.Select(Eval).ToList();
            object? Named(string n, int pos, object? dflt)
            {
                foreach (var (name, ex) in f.A.Named) if (name == n) return Eval(ex);
                return pos < args.Count ? args[pos] : dflt;
            }
            switch (f.Filter)
            {
                case "trim": return ToText(v).Trim();
                case "upper": return ToText(v).ToUpperInvariant();
                case "lower": return ToText(v).ToLowerInvariant();
                case "capitalize": { var s = ToText(v); return s.Length == 0 ? s : char.ToUpperInvariant(s[0]) + s[1..].ToLowerInvariant(); }
                case "title": return Title(ToText(v));
                case "string": return ToText(v);
                case "length" or "count":
                    return v switch
                    {
                        string s => (long)s.Length, List<object?> l => (long)l.Count, Dictionary<string, object?> d => (long)d.Count,
                        _ => throw Error(f.Line, $"length of {TypeName(v)}"),
                    };
                case "default" or "d":
                {
                    bool boolean = Truthy(Named("boolean", 1, false));
                    return v is Undefined || (boolean && !Truthy(v)) ? Named("default_value", 0, "") : v;
                }
                case "tojson":
                {
                    var indent = Named("indent", 0, null);
                    var sb = new StringBuilder();
                    Json(sb, v, indent is long n ? (int)n : null, 0, f.Line);
                    return sb.ToString();
                }
                case "join":
                {
                    string sep = ToText(Named("d", 0, ""));
                    if (v is not List<object?> l) throw Error(f.Line, $"join of {TypeName(v)}");
                    var sb = new StringBuilder();
                    for (int i = 0; i < l.Count; i++)
                    {
                        if (i > 0) sb.Append(sep);
                        sb.Append(ToText(l[i]));
                        CheckSize(f.Line, sb.Length, "a string");
                    }
                    return sb.ToString();
                }
                case "first": return v switch { List<object?> { Count: > 0 } l => l[0], string { Length: > 0 } s => s[0].ToString(), _ => Undefined.Instance };
                case "last": return v switch { List<object?> { Count: > 0 } l => l[^1], string { Length: > 0 } s => s[^1].ToString(), _ => Undefined.Instance };
                case "list": return v switch { List<object?> l => l.ToList(), string s => s.Select(c => (object?)c.ToString()).ToList(), Dictionary<string, object?> d => d.Keys.Select(k => (object?)k).ToList(), _ => throw Error(f.Line, $"list of {TypeName(v)}") };
                case "reverse": return v switch { List<object?> l => Enumerable.Reverse(l).ToList(), string s => new string(s.Reverse().ToArray()), _ => throw Error(f.Line, $"reverse of {TypeName(v)}") };
                case "items": return v is Dictionary<string, object?> d2 ? d2.Select(kv => (object?)new List<object?> { kv.Key, kv.Value }).ToList() : throw Error(f.Line, $"items of {TypeName(v)}");
                case "int": return v switch { long x => x, double x => (long)x, bool b => b ? 1L : 0L, string s when long.TryParse(s.Trim(), NumberStyles.Integer, CultureInfo.InvariantCulture, out long x) => x, _ => 0L };
                case "float": return v switch { long x => (double)x, double x => x, string s when double.TryParse(s.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out double x) => x, _ => 0.0 };
                case "replace":
                {
                    return Replace(f.Line, ToText(v), ToText(Named("old", 0, "")), ToText(Named("new", 1, "")));
                }
                default:
                    throw Error(f.Line, $"unsupported construct: the filter |{f.Filter} (supported: trim, upper, lower, capitalize, title, string, " +
                        "length, count, default, tojson, join, first, last, list, reverse, items, int, float, replace)");
            }
        }

        private bool Test(TestExpr t)
        {
            var v = Eval(t.Value);
            return t.Test switch
            {
                "defined" => v is not Undefined,
                "undefined" => v is Undefined,
                "none" => v is null,
                "string" => v is string,
                "number" => v is long or double,
                "integer" => v is long,
                "float" => v is double,
                "boolean" => v is bool,
                "true" => v is true,
                "false" => v is false,
                "mapping" => v is Dictionary<string, object?>,
                "sequence" or "iterable" => v is List<object?> or string or Dictionary<string, object?>,
                "even" => v is long x && x % 2 == 0,
                "odd" => v is long y && y % 2 != 0,
                _ => throw Error(t.Line, $"unsupported construct: the test 'is {t.Test}' (supported: defined, undefined, none, string, number, integer, " +
                    "float, boolean, true, false, mapping, sequence, iterable, even, odd)"),
            };
        }

        private object? Binary(BinExpr b)
        {
            if (b.Op == "and") { var l = Eval(b.L); return Truthy(l) ? Eval(b.R) : l; }
            if (b.Op == "or") { var l = Eval(b.L); return Truthy(l) ? l : Eval(b.R); }
            var x = Eval(b.L);
            var y = Eval(b.R);
            switch (b.Op)
            {
                case "~":
                {
                    string a = ToText(x), c = ToText(y);
                    CheckSize(b.Line, (long)a.Length + c.Length, "a string");
                    return a + c;
                }
                case "==": return Equal(x, y);
                case "!=": return !Equal(x, y);
                case "in": return Contains(b.Line, y, x);
                case "not in": return !Contains(b.Line, y, x);
                case "<" or "<=" or ">" or ">=":
                {
                    int c = Compare(b.Line, x, y);
                    return b.Op switch { "<" => c < 0, "<=" => c <= 0, ">" => c > 0, _ => c >= 0 };
                }
                case "+":
                    if (x is string s1 && y is string s2) { CheckSize(b.Line, (long)s1.Length + s2.Length, "a string"); return s1 + s2; }
                    if (x is List<object?> l1 && y is List<object?> l2) { CheckSize(b.Line, (long)l1.Count + l2.Count, "a list"); return l1.Concat(l2).ToList(); }
                    break;
                case "*":
                    if (x is string && y is long || y is string && x is long)
                    {
                        string str = x as string ?? (string)y!;
                        long times = Math.Max(0, x is long xl ? xl : (long)y!);
                        CheckSize(b.Line, times > _limits.MaxOutputChars && str.Length > 0 ? long.MaxValue : str.Length * times, "a string");
                        return string.Concat(Enumerable.Repeat(str, (int)times));
                    }
                    if (x is List<object?> rl && y is long rln)
                    {
                        CheckSize(b.Line, rln > _limits.MaxOutputChars && rl.Count > 0 ? long.MaxValue : rl.Count * Math.Max(0, rln), "a list");
                        return Enumerable.Range(0, (int)Math.Max(0, rln)).SelectMany(_ => rl).ToList();
                    }
                    break;
            }
            if (IsNumber(x) && IsNumber(y))
            {
                if (x is long or bool && y is long or bool && b.Op is not "/" and not "**")
                {
                    long p = AsLong(x), q = AsLong(y);
                    switch (b.Op)
                    {
                        case "+": return p + q;
                        case "-": return p - q;
                        case "*": return p * q;
                        case "//": if (q == 0) throw Error(b.Line, "division by zero"); return (long)Math.Floor((double)p / q);
                        case "%": if (q == 0) throw Error(b.Line, "division by zero"); return ((p % q) + q) % q;
                    }
                }
                if (x is long or bool && y is long or bool && b.Op == "**" && AsLong(y) >= 0)
                {
                    double r = Math.Pow(AsLong(x), AsLong(y));
                    if (Math.Abs(r) > 9e15) throw Error(b.Line, "** result too large");
                    return (long)r;
                }
                double dp = AsDouble(x), dq = AsDouble(y);
                switch (b.Op)
                {
                    case "+": return dp + dq;
                    case "-": return dp - dq;
                    case "*": return dp * dq;
                    case "/": if (dq == 0) throw Error(b.Line, "division by zero"); return dp / dq;
                    case "//": if (dq == 0) throw Error(b.Line, "division by zero"); return Math.Floor(dp / dq);
                    case "%": if (dq == 0) throw Error(b.Line, "division by zero"); return dp - Math.Floor(dp / dq) * dq;
                    case "**": return Math.Pow(dp, dq);
                }
            }
            if (b.Op == "%" && x is string) throw Error(b.Line, "unsupported construct: % string formatting");
            throw Error(b.Line, $"cannot apply {b.Op} to {TypeName(x)} and {TypeName(y)}");
        }

        private bool Contains(int line, object? container, object? item) => container switch
        {
            string s => item is string sub ? s.Contains(sub, StringComparison.Ordinal) : throw Error(line, $"'in <string>' needs a string, not {TypeName(item)}"),
            List<object?> l => l.Any(x => Equal(x, item)),
            Dictionary<string, object?> d => item is string k && d.ContainsKey(k),
            Namespace ns => item is string nk && ns.Attrs.ContainsKey(nk),
            Undefined => false,
            _ => throw Error(line, $"'in' needs a string, list or dict, not {TypeName(container)}"),
        };

        private int Compare(int line, object? x, object? y)
        {
            if (IsNumber(x) && IsNumber(y)) return AsDouble(x).CompareTo(AsDouble(y));
            if (x is string a && y is string c) return string.CompareOrdinal(a, c);
            throw Error(line, $"cannot compare {TypeName(x)} and {TypeName(y)}");
        }

        private static bool IsNumber(object? v) => v is long or double or bool;
        private static long AsLong(object? v) => v switch { long l => l, bool b => b ? 1 : 0, double d => (long)d, _ => 0 };
        private static double AsDouble(object? v) => v switch { long l => l, bool b => b ? 1 : 0, double d => d, _ => 0 };

        private static bool Equal(object? x, object? y) => Equal(x, y, 0);

        private static bool Equal(object? x, object? y, int level)
        {
            GuardValueDepth(level);
            if (x is Undefined || y is Undefined) return x is Undefined && y is Undefined;
            if (x is null || y is null) return x is null && y is null;
            if (IsNumber(x) && IsNumber(y)) return AsDouble(x) == AsDouble(y);
            if (x is string a && y is string c) return a == c;
            if (x is List<object?> l1 && y is List<object?> l2) return l1.Count == l2.Count && l1.Zip(l2).All(p => Equal(p.First, p.Second, level + 1));
            if (x is Dictionary<string, object?> d1 && y is Dictionary<string, object?> d2)
                return d1.Count == d2.Count && d1.All(kv => d2.TryGetValue(kv.Key, out var v) && Equal(kv.Value, v, level + 1));
            return ReferenceEquals(x, y);
        }

        private static bool Truthy(object? v) => v switch
        {
            null or Undefined => false,
            bool b => b,
            long l => l != 0,
            double d => d != 0,
            string s => s.Length > 0,
            List<object?> l => l.Count > 0,
            Dictionary<string, object?> d => d.Count > 0,
            _ => true,
        };

        private static string TypeName(object? v) => v switch
        {
            null => "none", Undefined => "an undefined value", string => "a string", bool => "a bool", long => "an integer", double => "a float",
            List<object?> => "a list", Dictionary<string, object?> => "a dict", Namespace => "a namespace", _ => "a value",
        };

        private static string Title(string s)
        {
            var sb = new StringBuilder(s.Length);
            bool start = true;
            foreach (char c in s)
            {
                sb.Append(start ? char.ToUpperInvariant(c) : char.ToLowerInvariant(c));
                start = !char.IsLetter(c);
            }
            return sb.ToString();
        }

        /// <summary>Text of a value as Jinja prints it (Python's str: True, None, 1.0, ['a', 1]); bounded by the output limit.</summary>
        private string ToText(object? v) => v switch
        {
            string s => s,
            Undefined => "",
            _ => Repr(v),
        };

        private string Repr(object? v)
        {
            var sb = new StringBuilder();
            Repr(sb, v, 0);
            return sb.ToString();
        }

        private void Repr(StringBuilder sb, object? v, int level)
        {
            GuardValueDepth(level);
            if (sb.Length > _limits.MaxOutputChars)
                throw Error(_line, $"the output limit ({_limits.MaxOutputChars:N0} characters) was exceeded by the text of a value");
            switch (v)
            {
                case null: sb.Append("None"); return;
                case Undefined: return;
                case bool b: sb.Append(b ? "True" : "False"); return;
                case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); return;
                case double d:
                    sb.Append(double.IsInteger(d) && Math.Abs(d) < 1e16 ? d.ToString("0.0", CultureInfo.InvariantCulture) : d.ToString("R", CultureInfo.InvariantCulture));
                    return;
                case string s:
                    sb.Append('\'').Append(s.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("'", "\\'", StringComparison.Ordinal)
                        .Replace("\n", "\\n", StringComparison.Ordinal)).Append('\'');
                    return;
                case List<object?> list:
                    sb.Append('[');
                    for (int i = 0; i < list.Count; i++)
                    {
                        if (i > 0) sb.Append(", ");
                        Repr(sb, list[i], level + 1);
                    }
                    sb.Append(']');
                    return;
                case Dictionary<string, object?> dict:
                    sb.Append('{');
                    int k = 0;
                    foreach (var (key, value) in dict)
                    {
                        if (k++ > 0) sb.Append(", ");
                        Repr(sb, key, level + 1);
                        sb.Append(": ");
                        Repr(sb, value, level + 1);
                    }
                    sb.Append('}');
                    return;
                case Namespace: sb.Append("<Namespace>"); return;
            }
        }

        /// <summary>s.Replace(from, to), its length checked against the output limit before it is built.</summary>
        private string Replace(int line, string s, string from, string to)
        {
            if (from.Length == 0) throw Error(line, "replace of an empty string is not supported");
            long count = 0;
            for (int i = s.IndexOf(from, StringComparison.Ordinal); i >= 0; i = s.IndexOf(from, i + from.Length, StringComparison.Ordinal)) count++;
            CheckSize(line, s.Length + count * (to.Length - from.Length), "a string");
            return s.Replace(from, to, StringComparison.Ordinal);
        }

        /// <summary>json.dumps(v, ensure_ascii=False, indent=indent): ", " and ": " separators without indent, as transformers' tojson.</summary>
        private void Json(StringBuilder sb, object? v, int? indent, int level, int line)
        {
            Step(line);
            GuardValueDepth(level);
            CheckSize(line, sb.Length, "tojson's text");
            switch (v)
            {
                case null or Undefined: sb.Append("null"); return;
                case bool b: sb.Append(b ? "true" : "false"); return;
                case long l: sb.Append(l.ToString(CultureInfo.InvariantCulture)); return;
                case double d: sb.Append(Repr(d)); return;
                case string s: JsonString(sb, s); return;
                case Namespace: throw Error(line, "tojson of a namespace");
                case List<object?> list:
                    if (list.Count == 0) { sb.Append("[]"); return; }
                    sb.Append('[');
                    for (int i = 0; i < list.Count; i++)
                    {
                        if (i > 0) sb.Append(indent is null ? ", " : ",");
                        NewLine(sb, indent, level + 1);
                        Json(sb, list[i], indent, level + 1, line);
                    }
                    NewLine(sb, indent, level);
                    sb.Append(']');
                    return;
                case Dictionary<string, object?> dict:
                    if (dict.Count == 0) { sb.Append("{}"); return; }
                    sb.Append('{');
                    int k = 0;
                    foreach (var (key, value) in dict)
                    {
                        if (k++ > 0) sb.Append(indent is null ? ", " : ",");
                        NewLine(sb, indent, level + 1);
                        JsonString(sb, key);
                        sb.Append(": ");
                        Json(sb, value, indent, level + 1, line);
                    }
                    NewLine(sb, indent, level);
                    sb.Append('}');
                    return;
            }
        }

        private static void NewLine(StringBuilder sb, int? indent, int level)
        {
            if (indent is not int n) return;
            sb.Append('\n').Append(' ', n * level);
        }

        private static void JsonString(StringBuilder sb, string s) => sb.Append(NativePeft.IO.PythonJson.String(s, ensureAscii: false));
    }
}
