import Foundation
import Testing
import TestSupport
import JSON
@testable import BlockCore
@testable import BlockDrivers

/// A minimal node registry for driver tests.
final class QCOW2TestRegistry: NodeRegistry {
    var nodes: [String: BlockNode] = [:]
    var order: [BlockNode] = []
    var counter = 0
    func node(named name: String) -> BlockNode? { nodes[name] }
    func makeAutoName() -> String { counter += 1; return "#block\(counter)" }
    func register(_ node: BlockNode) throws(BlockError) {
        if nodes[node.nodeName] != nil { throw BlockError.invalid("duplicate \(node.nodeName)") }
        nodes[node.nodeName] = node
        order.append(node)
    }
    /// Closes format nodes (top first), then files.
    func closeAll() throws {
        for n in order.reversed() where n.driver.role == .format { try n.driver.close() }
        for n in order.reversed() where n.driver.role == .protocol { try n.driver.close() }
    }
}

enum QCOW2Tools {
    static func find(_ name: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }
    static let qemuImg = find("qemu-img")
    static let qemuIO = find("qemu-io")

    @discardableResult
    static func run(_ tool: String, _ args: [String], allowFailure: Bool = false) throws -> (status: Int32, output: String) {
        guard let path = find(tool) else { throw BlockError.notSupported("\(tool) missing") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let out = String(decoding: data, as: UTF8.self)
        if !allowFailure && p.terminationStatus != 0 {
            Issue.record("\(tool) \(args.joined(separator: " ")) failed (\(p.terminationStatus)): \(out)")
        }
        return (p.terminationStatus, out)
    }

    static func qemuImg(_ args: String...) throws -> (status: Int32, output: String) { try run("qemu-img", args) }
    static func qemuIO(_ image: String, _ commands: String...) throws {
        var args = ["-f", "qcow2"]
        for c in commands { args += ["-c", c] }
        args.append(image)
        try run("qemu-io", args)
    }
}

/// A temporary directory removed at deinit.
final class QCOW2TempDir {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "qcow2test-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { path + "/" + name }
}

extension Trait where Self == ConditionTrait {
    /// Runs only when qemu-img/qemu-io exist: a skip on a laptop, a failure under CI.
    static var needsQemu: ConditionTrait { .requires("qemu-img", "qemu-io") }
}

enum QCOW2Test {
    static func options(_ path: String, _ extra: [(String, JSONValue)] = []) -> JSONObject {
        let file = JSONObject([("driver", .string("file")), ("filename", .string(path))])
        // discard=unmap: the tests model discards as reaching the image (blockdev-add's
        // default, as QEMU's, is discard=ignore).
        return JSONObject([("driver", .string("qcow2")), ("file", .object(file)), ("discard", .string("unmap"))] + extra)
    }

    static func open(_ path: String, readOnly: Bool = false, extra: [(String, JSONValue)] = [],
                     registry: QCOW2TestRegistry = QCOW2TestRegistry()) throws -> BlockNode {
        registerFormats()
        var opts = options(path, extra)
        if readOnly {
            opts["read-only"] = .bool(true)
            var f = opts["file"]!.objectValue!
            f["read-only"] = .bool(true)
            opts["file"] = .object(f)
        }
        return try BlockdevFactory.open(opts, in: registry)
    }

    static func readAll(_ node: BlockNode, chunk: Int = 1 << 20) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(node.length))
        var off = 0
        while off < out.count {
            let n = min(chunk, out.count - off)
            try out.withUnsafeMutableBytes { raw in
                try node.read(at: UInt64(off), into: UnsafeMutableRawBufferPointer(rebasing: raw[off..<(off + n)]))
            }
            off += n
        }
        return out
    }

    static func write(_ node: BlockNode, _ offset: UInt64, _ bytes: [UInt8], flags: RequestFlags = []) throws {
        try bytes.withUnsafeBytes { try node.write(at: offset, from: $0, flags: flags) }
    }

    /// The chain's content as raw bytes, according to qemu-img.
    static func convertToRaw(_ image: String, in dir: QCOW2TempDir) throws -> [UInt8] {
        let out = dir.file("convert-\(UUID().uuidString).raw")
        try QCOW2Tools.qemuImg("convert", "-O", "raw", image, out)
        defer { try? FileManager.default.removeItem(atPath: out) }
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
    }

    static func md5(_ path: String) throws -> String {
        try QCOW2Tools.run("md5sum", [path]).output
    }

    /// `qemu-img check` reports no errors and no leaks.
    static func expectClean(_ image: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try QCOW2Tools.run("qemu-img", ["check", image], allowFailure: true)
        #expect(r.status == 0, "qemu-img check: \(r.output)", sourceLocation: sourceLocation)
        #expect(!r.output.contains("leaked"), "qemu-img check: \(r.output)", sourceLocation: sourceLocation)
    }

    static func pattern(_ byte: UInt8, _ count: Int) -> [UInt8] { [UInt8](repeating: byte, count: count) }
}
