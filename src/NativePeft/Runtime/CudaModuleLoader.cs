using System.Text;

namespace NativePeft.Runtime;

/// <summary>
/// Loads kernel images into a context: a fatbin/cubin with cuModuleLoadData, PTX (NUL-terminated, as
/// the driver requires) with cuModuleLoadDataEx and a JIT error-log buffer, so a PTX that does not
/// compile reports the JIT compiler's message.
/// </summary>
internal static unsafe class CudaModuleLoader
{
    /// <summary>Size of the JIT error log buffer (CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES).</summary>
    public const int JitLogBytes = 16 * 1024;

    /// <summary>The PTX text as the driver must see it: the same bytes, ending with exactly one NUL added if missing.</summary>
    public static byte[] PreparePtx(ReadOnlySpan<byte> ptx)
    {
        if (!ptx.IsEmpty && ptx[^1] == 0) return ptx.ToArray();
        var bytes = new byte[ptx.Length + 1];
        ptx.CopyTo(bytes);
        bytes[^1] = 0;
        return bytes;
    }

    /// <summary>cuModuleLoadData on a binary image (fatbin or cubin). Returns the result, never throws.</summary>
    public static CuResult TryLoadImage(ReadOnlySpan<byte> image, out IntPtr module)
    {
        if (image.IsEmpty) { module = IntPtr.Zero; return CuResult.InvalidImage; }
        fixed (byte* p = image) return CudaDriver.cuModuleLoadData(out module, p);
    }

    /// <summary>cuModuleLoadDataEx on PTX text with a JIT error log. Returns the result and the log (possibly empty).</summary>
    public static CuResult TryLoadPtx(ReadOnlySpan<byte> ptx, out IntPtr module, out string jitLog)
    {
        var text = PreparePtx(ptx);
        var log = new byte[JitLogBytes];
        CuJitOption* options = stackalloc CuJitOption[2];
        void** values = stackalloc void*[2];
        options[0] = CuJitOption.ErrorLogBuffer;
        options[1] = CuJitOption.ErrorLogBufferSizeBytes;
        CuResult result;
        fixed (byte* pText = text)
        fixed (byte* pLog = log)
        {
            values[0] = pLog;
            values[1] = (void*)(nuint)log.Length;
            result = CudaDriver.cuModuleLoadDataEx(out module, pText, 2, options, values);
        }
        // On return the size option holds the bytes written (including the NUL); be defensive either way.
        int written = Array.IndexOf(log, (byte)0);
        if (written < 0) written = log.Length;
        jitLog = Encoding.UTF8.GetString(log, 0, written).Trim();
        return result;
    }
}
