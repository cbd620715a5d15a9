using NUnit.Framework;
namespace NativePeft.Tests;
public class SmokeTests
{
    [Test]
    public void DevicePtrOffsetAdds() => Assert.That(new NativePeft.Runtime.DevicePtr(16).Offset(8).Address, Is.EqualTo(24UL));
}
