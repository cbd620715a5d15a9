using System.Text;
using NativePeft.IO;
using NativePeft.Numerics;
using NUnit.Framework;

namespace NativePeft.Tests.IO;

/// <summary>Tensors past 2 GB (Llama-3-70B's bf16 embeddings are 2.1 GB): typed and ranged reads.</summary>
public class SafetensorsLargeTests
{
    [Test]
    public void ATensorOver2GBReadsAsATypedSpanAndInRanges()
    {
        const long elements = 1_100_000_000; // bf16: 2.2 GB
        var dir = Directory.CreateTempSubdirectory("nativepeft-large-").FullName;
        try
        {
            var path = Path.Combine(dir, "big.safetensors");
            // docs/formats.md: u64 header length, the JSON header, then the data (a sparse file: nothing is written to disk).
            var header = Encoding.UTF8.GetBytes($"{{\"w\":{{\"dtype\":\"BF16\",\"shape\":[{elements}],\"data_offsets\":[0,{elements * 2}]}}}}");
            using (var f = File.Create(path))
            {
                f.Write(BitConverter.GetBytes((ulong)header.Length));
                f.Write(header);
                f.SetLength(8 + header.Length + elements * 2);
                f.Position = 8 + header.Length + (elements - 1) * 2;
                f.Write(BitConverter.GetBytes(BFloat16.One.RawValue)); // the last element is 1.0
            }
            using var file = SafetensorsFile.Open(path);
            var all = file.GetSpan<BFloat16>("w");
            Assert.That(all.Length, Is.EqualTo(elements));
            Assert.That(all[^1].ToSingle(), Is.EqualTo(1f));
            Assert.That(all[0].ToSingle(), Is.EqualTo(0f));
            var tail = file.GetSpan<BFloat16>("w", elements - 3, 3);
            Assert.That(tail.ToArray().Select(x => x.ToSingle()), Is.EqualTo(new[] { 0f, 0f, 1f }));
            Assert.That(() => file.GetBytes("w"), Throws.TypeOf<SafetensorsException>().With.Message.Contains("do not fit one span"));
            Assert.That(() => file.GetSpan<BFloat16>("w", elements - 1, 2), Throws.TypeOf<SafetensorsException>().With.Message.Contains("outside"));
        }
        finally { Directory.Delete(dir, recursive: true); }
    }
}
