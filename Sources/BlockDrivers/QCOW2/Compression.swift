import BlockCore
import CZlib
import CZstdLoader
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Decompression of qcow2 compressed clusters: zlib raw deflate (window bits -12) or zstd.
/// Decompression stops once a whole cluster has been produced; trailing bytes (the rest of
/// the last sector, possibly the next compressed cluster) are ignored.
enum QCOW2Compression {
    static func decompress(type: UInt8, input: UnsafeRawBufferPointer,
                           output: UnsafeMutableRawBufferPointer) -> Bool {
        switch type {
        case 0: return inflateRaw(input, output)
        case 1: return zstdDecompress(input, output)
        default: return false
        }
    }

    private static func inflateRaw(_ input: UnsafeRawBufferPointer, _ output: UnsafeMutableRawBufferPointer) -> Bool {
        var stream = z_stream()
        let initResult = inflateInit2_(&stream, -12, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size))
        guard initResult == Z_OK else { return false }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        stream.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(output.count)
        let r = inflate(&stream, Z_FINISH)
        // Success: the stream ended, or the output filled up (the input may run on).
        return (r == Z_STREAM_END || r == Z_BUF_ERROR) && stream.avail_out == 0
    }

    private static func zstdDecompress(_ input: UnsafeRawBufferPointer, _ output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let ctx = blockd_zstd_create() else { return false }
        defer { blockd_zstd_free(ctx) }
        var inBuf = blockd_zstd_in(src: input.baseAddress, size: input.count, pos: 0)
        var outBuf = blockd_zstd_out(dst: output.baseAddress, size: output.count, pos: 0)
        while outBuf.pos < outBuf.size {
            let beforeIn = inBuf.pos
            let beforeOut = outBuf.pos
            let r = blockd_zstd_decompress_stream(ctx, &outBuf, &inBuf)
            if blockd_zstd_is_error(r) != 0 { return false }
            if outBuf.pos == outBuf.size { break }
            // A frame that ended early, or no progress (input exhausted): not a whole cluster.
            if r == 0 || (inBuf.pos == beforeIn && outBuf.pos == beforeOut) { return false }
        }
        return true
    }
}

/// Compression of one cluster as QEMU writes it (`qcow2_co_compress`): zlib raw deflate with
/// a 4 KiB window (bits -12), memLevel 9, the default level; or one zstd frame at zstd's
/// default level (`ZSTD_compressStream2(…, ZSTD_e_end)`). Same settings, same sizes as QEMU.
///
/// Compression contexts are expensive to set up (a deflate state is about 270 KiB), so a few
/// are kept between requests in `QCOW2CompressorPool`.
extension QCOW2Compression {
    /// Compresses `input` (one cluster) into `output`. Returns the compressed length, or nil
    /// when the result does not fit in `output` (the data does not compress well enough).
    static func compress(type: UInt8, input: UnsafeRawBufferPointer,
                         output: UnsafeMutableRawBufferPointer) throws(BlockError) -> Int? {
        switch type {
        case 0: return try deflateRaw(input, output)
        case 1: return try zstdCompress(input, output)
        default: throw BlockError.notSupported("qcow2 compression type \(type) is not supported")
        }
    }

    private static func deflateRaw(_ input: UnsafeRawBufferPointer, _ output: UnsafeMutableRawBufferPointer) throws(BlockError) -> Int? {
        let pool = QCOW2CompressorPool.shared
        guard let stream = pool.takeDeflate() else { throw BlockError(ENOMEM, "zlib: cannot set up compression") }
        stream.pointee.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        stream.pointee.avail_in = uInt(input.count)
        stream.pointee.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        stream.pointee.avail_out = uInt(output.count)
        let r = deflate(stream, Z_FINISH)
        let produced = output.count - Int(stream.pointee.avail_out)
        // Reset for the next user (also after a stream that did not finish).
        let reusable = deflateReset(stream) == Z_OK
        pool.giveDeflate(stream, reusable: reusable)
        switch r {
        case Z_STREAM_END: return produced
        case Z_OK, Z_BUF_ERROR: return nil  // output full before the end: not compressible enough
        default: throw BlockError.io("zlib: compression failed (\(r))")
        }
    }

    private static func zstdCompress(_ input: UnsafeRawBufferPointer, _ output: UnsafeMutableRawBufferPointer) throws(BlockError) -> Int? {
        guard blockd_zstd_compress_available() != 0 else {
            throw BlockError.notSupported("zstd compression needs libzstd.so.1 from zstd 1.4 or later")
        }
        let pool = QCOW2CompressorPool.shared
        guard let ctx = pool.takeZstd() else { throw BlockError(ENOMEM, "zstd: cannot set up compression") }
        var inBuf = blockd_zstd_in(src: input.baseAddress, size: input.count, pos: 0)
        var outBuf = blockd_zstd_out(dst: output.baseAddress, size: output.count, pos: 0)
        let r = blockd_zstd_compress_end(ctx, &outBuf, &inBuf)
        // A context is reusable only after a finished frame; otherwise it is dropped.
        pool.giveZstd(ctx, reusable: r == 0)
        if blockd_zstd_is_error(r) != 0 { throw BlockError.io("zstd: compression failed") }
        return r == 0 ? outBuf.pos : nil
    }
}

/// Compression contexts kept for reuse: at most `keep` of each kind; more are created when
/// many requests compress at once and freed afterwards.
final class QCOW2CompressorPool: Sendable {
    static let shared = QCOW2CompressorPool()
    private static let keep = 8
    // Contexts are stored as addresses: each is used by one thread at a time (taken out of the
    // list under the lock, given back when done).
    private let deflates = Mutex<[UInt]>([])
    private let zstds = Mutex<[UInt]>([])

    func takeDeflate() -> UnsafeMutablePointer<z_stream>? {
        if let a = deflates.withLock({ $0.popLast() }) { return UnsafeMutablePointer(bitPattern: a) }
        let s = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
        s.initialize(to: z_stream())
        let r = deflateInit2_(s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                              ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size))
        if r != Z_OK {
            s.deallocate()
            return nil
        }
        return s
    }

    func giveDeflate(_ s: UnsafeMutablePointer<z_stream>, reusable: Bool) {
        if reusable && deflates.withLock({ (list) -> Bool in
            if list.count >= Self.keep { return false }
            list.append(UInt(bitPattern: s))
            return true
        }) { return }
        deflateEnd(s)
        s.deallocate()
    }

    func takeZstd() -> UnsafeMutableRawPointer? {
        if let a = zstds.withLock({ $0.popLast() }) { return UnsafeMutableRawPointer(bitPattern: a) }
        return blockd_zstd_create_cctx()
    }

    func giveZstd(_ ctx: UnsafeMutableRawPointer, reusable: Bool) {
        if reusable && zstds.withLock({ (list) -> Bool in
            if list.count >= Self.keep { return false }
            list.append(UInt(bitPattern: ctx))
            return true
        }) { return }
        blockd_zstd_free_cctx(ctx)
    }
}

/// File access shared by the locked metadata code and the lock-free data path.
enum QCOW2IO {
    /// Reads from `file`; the part past its end reads as zeroes.
    static func readClipped(_ file: BlockNode, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                            flags: RequestFlags = []) throws(BlockError) {
        let length = file.length
        if offset >= length {
            if let b = buffer.baseAddress { memset(b, 0, buffer.count) }
            return
        }
        let avail = length - offset
        if UInt64(buffer.count) <= avail {
            try file.read(at: offset, into: buffer, flags: flags)
        } else {
            try file.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(avail)]), flags: flags)
            memset(buffer.baseAddress! + Int(avail), 0, buffer.count - Int(avail))
        }
    }

    /// Decodes a compressed cluster descriptor: host offset and byte count to read.
    static func compressedRange(_ entry: UInt64, clusterBits: UInt64) -> (offset: UInt64, size: UInt64) {
        let shift = 62 - (clusterBits - 8)
        let mask = (UInt64(1) << (clusterBits - 8)) - 1
        let offset = entry & ((UInt64(1) << shift) - 1)
        let sectors = ((entry >> shift) & mask) + 1
        return (offset, sectors * 512 - (offset & 511))
    }

    /// Encodes a compressed cluster descriptor (docs/interop/qcow2.txt, "Compressed Clusters
    /// Descriptor"): with x = 62 - (cluster_bits - 8), bits 0..x-1 hold the host byte offset
    /// and bits x..61 the number of 512-byte sectors the data covers beyond the one holding
    /// its first byte; bit 62 marks it compressed. `size` is the compressed length in bytes.
    static func compressedEntry(offset: UInt64, size: UInt64, clusterBits: UInt64) -> UInt64 {
        let shift = 62 - (clusterBits - 8)
        let extraSectors = (offset + size - 1) / 512 - offset / 512
        precondition(offset < (UInt64(1) << shift) && extraSectors < (UInt64(1) << (clusterBits - 8)),
                     "compressed cluster descriptor out of range")
        return QCOW2Entry.compressed | (extraSectors << shift) | offset
    }

    static func decompress(_ file: BlockNode, entry: UInt64, clusterBits: UInt64, type: UInt8, image: String,
                           into out: UnsafeMutableRawBufferPointer) throws(BlockError) {
        let (offset, size) = compressedRange(entry, clusterBits: clusterBits)
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(size), alignment: 16)
        defer { input.deallocate() }
        try readClipped(file, at: offset, into: input)
        if !QCOW2Compression.decompress(type: type, input: UnsafeRawBufferPointer(input), output: out) {
            throw BlockError.io("Image '\(image)' is corrupt: compressed cluster at \(offset) does not decompress; run 'qemu-img check'")
        }
    }
}
