import BlockCore
import CZlib
import CZstdLoader
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
