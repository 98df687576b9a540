/// The built-in self-checking test guest (guest/testguest.asm).
public enum TestGuest {
    /// Image offset of the little-endian 32-bit TOP field (end of the RAM the guest walks).
    public static let topOffset = 0x1f8
    /// The 8-byte tag right before TOP, so tools can find the field.
    public static let topTag = Array("FERRYTOP".utf8)
    /// The guest starts walking at 1 MiB.
    public static let bottom: UInt64 = 0x10_0000

    /// TOP for a guest with `memorySize` bytes of RAM at address 0: the whole RAM, kept
    /// below the 32-bit field's limit and the KVM TSS/identity pages under 4 GiB.
    public static func top(forMemory memorySize: Int) -> UInt32 {
        UInt32(min(UInt64(memorySize), 0xfff0_0000))
    }

    /// The boot sector with TOP set.
    public static func image(top: UInt32) -> [UInt8] {
        var img = testGuestBootSector
        precondition(Array(img[topOffset - 8..<topOffset]) == topTag, "test guest image lacks its TOP tag")
        withUnsafeBytes(of: top.littleEndian) { for i in 0..<4 { img[topOffset + i] = $0[i] } }
        return img
    }

    public static func image(forMemory memorySize: Int) -> [UInt8] { image(top: top(forMemory: memorySize)) }
}
