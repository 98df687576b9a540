import CZstd
import FerryWire

/// One multifd channel's zstd stream, as QEMU's multifd-zstd: one compression context for
/// the channel's life, each packet's pages compressed in order and flushed at the packet's
/// end (ZSTD_e_flush), so a packet decodes whole with what came before on its channel.
/// Ownership: created by the main thread and handed to the channel's one sender thread, the
/// only one that uses it from then on.
final class ZstdCompressor: @unchecked Sendable {
    private let ctx: OpaquePointer
    /// Compressed bytes of the packet being built.
    private(set) var output: UnsafeMutableRawBufferPointer

    init(level: Int) throws {
        guard let c = ZSTD_createCCtx() else { throw MigrationError(.resource, "multifd: cannot create a zstd context") }
        ctx = c
        let r = ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, Int32(level))
        output = .allocate(byteCount: MultiFD.maxCompressedSize, alignment: 16)
        if ZSTD_isError(r) != 0 { throw MigrationError(.config, "multifd: zstd level \(level): \(zstdError(r))") }
    }

    deinit {
        ZSTD_freeCCtx(ctx)
        output.deallocate()
    }

    /// Compresses `pages` (guest pages, read now) into `output`; returns the byte count.
    func compress(_ pages: [UnsafeRawPointer]) throws -> Int {
        var out = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        for (k, p) in pages.enumerated() {
            var input = ZSTD_inBuffer(src: p, size: Wire.pageSize, pos: 0)
            let last = k == pages.count - 1
            while true {
                let left = ZSTD_compressStream2(ctx, &out, &input, last ? ZSTD_e_flush : ZSTD_e_continue)
                if ZSTD_isError(left) != 0 { throw MigrationError(.io, "multifd: zstd compression failed: \(zstdError(left))") }
                // continue: done once the page is taken in; flush: once nothing is left to write.
                if last ? left == 0 : input.pos == input.size { break }
                if out.pos == out.size { throw MigrationError(.io, "multifd: compressed packet larger than \(output.count) bytes") }
            }
        }
        return out.pos
    }
}

/// The receiving end of `ZstdCompressor`. Ownership: handed at creation to the channel's
/// receiver thread, the only one that uses it.
final class ZstdDecompressor: @unchecked Sendable {
    private let ctx: OpaquePointer

    init() throws {
        guard let c = ZSTD_createDCtx() else { throw MigrationError(.resource, "multifd: cannot create a zstd context") }
        ctx = c
    }

    deinit { ZSTD_freeDCtx(ctx) }

    /// Decompresses `input` into `pages`, a whole page each; every input byte must be used
    /// and every page filled (QEMU's checks).
    func decompress(_ input: UnsafeRawBufferPointer, into pages: [UnsafeMutableRawPointer]) throws {
        var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        for p in pages {
            var out = ZSTD_outBuffer(dst: p, size: Wire.pageSize, pos: 0)
            while out.pos < out.size {
                let (inBefore, outBefore) = (inBuf.pos, out.pos)
                let r = ZSTD_decompressStream(ctx, &out, &inBuf)
                if ZSTD_isError(r) != 0 { throw MigrationError(.protocolError, "multifd: zstd decompression failed: \(zstdError(r))") }
                // No progress: the packet's data ended inside a page.
                if inBuf.pos == inBefore && out.pos == outBefore { break }
            }
            guard out.pos == Wire.pageSize else {
                throw MigrationError(.protocolError, "multifd: zstd packet decoded \(out.pos) bytes for a page of \(Wire.pageSize)")
            }
        }
        guard inBuf.pos == inBuf.size else {
            throw MigrationError(.protocolError, "multifd: \(inBuf.size - inBuf.pos) bytes of a zstd packet left after its pages")
        }
    }
}

private func zstdError(_ code: Int) -> String { String(cString: ZSTD_getErrorName(code)) }
