using System.Buffers;
using System.IO.MemoryMappedFiles;

namespace NativePeft.IO;

/// <summary>
/// A read-only view of a whole memory-mapped file as spans and Memory. The one place in IO that uses a pointer:
/// spans over a mapping need one (acquired once, released on Dispose).
/// </summary>
internal sealed unsafe class MappedView : IDisposable
{
    private readonly MemoryMappedViewAccessor _accessor;
    private byte* _pointer;
    private readonly long _length;

    public bool IsDisposed => _pointer == null;

    public MappedView(MemoryMappedFile map, long length)
    {
        _accessor = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
        byte* p = null;
        _accessor.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
        _pointer = p + _accessor.PointerOffset;
        _length = length;
    }

    public ReadOnlySpan<byte> Span(long offset, int length)
    {
        ObjectDisposedException.ThrowIf(_pointer == null, this);
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        if (offset + length > _length) throw new ArgumentOutOfRangeException(nameof(length));
        return new ReadOnlySpan<byte>(_pointer + offset, length);
    }

    /// <summary><paramref name="count"/> elements of T from byte <paramref name="offset"/> (the bytes may exceed 2 GB).</summary>
    public ReadOnlySpan<T> Span<T>(long offset, int count) where T : unmanaged
    {
        ObjectDisposedException.ThrowIf(_pointer == null, this);
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        if (offset + (long)count * sizeof(T) > _length) throw new ArgumentOutOfRangeException(nameof(count));
        return new ReadOnlySpan<T>(_pointer + offset, count);
    }

    public ReadOnlyMemory<byte> MemoryAt(long offset, int length)
    {
        ObjectDisposedException.ThrowIf(_pointer == null, this);
        if (offset + length > _length) throw new ArgumentOutOfRangeException(nameof(length));
        return new SliceManager(this, offset, length).Memory;
    }

    public void Dispose()
    {
        if (_pointer != null)
        {
            _pointer = null;
            _accessor.SafeMemoryMappedViewHandle.ReleasePointer();
            _accessor.Dispose();
        }
    }

    /// <summary>A Memory over [offset, offset+length) of the view (files may be larger than 2 GB).</summary>
    private sealed class SliceManager(MappedView owner, long offset, int length) : MemoryManager<byte>
    {
        public override Span<byte> GetSpan()
        {
            ObjectDisposedException.ThrowIf(owner._pointer == null, owner);
            return new Span<byte>(owner._pointer + offset, length);
        }

        public override MemoryHandle Pin(int elementIndex = 0) => new(owner._pointer + offset + elementIndex);
        public override void Unpin() { }
        protected override void Dispose(bool disposing) { }
    }
}
