#if canImport(Glibc)
import Glibc
#endif

/// What /proc says about a process (Linux), for resource tests.
public enum Proc {
    /// Resident set size in KiB (`VmRSS`), 0 if the process is gone.
    public static func rssKiB(_ pid: pid_t) -> Int {
        guard let text = try? Files.read("/proc/\(pid)/status") else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? 0
        }
        return 0
    }

    /// User plus system CPU time in clock ticks (`/proc/PID/stat` fields 14 and 15).
    public static func cpuTicks(_ pid: pid_t) -> Int {
        guard let text = try? Files.read("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return 0 }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // After the command: state is field 3, so utime (14) and stime (15) are at 11 and 12.
        guard fields.count > 12 else { return 0 }
        return (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
    }

    /// True when one of the process's threads sits in `write(2)` on `fd` (`/proc/PID/task/TID/
    /// syscall` starts with the syscall number 1 and the descriptor): a writer blocked on a
    /// full pipe.
    public static func threadBlockedWriting(_ pid: pid_t, fd: Int32) -> Bool {
        guard let d = opendir("/proc/\(pid)/task") else { return false }
        defer { closedir(d) }
        while let e = readdir(d) {
            let tid = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard Int(tid) != nil, let text = try? Files.read("/proc/\(pid)/task/\(tid)/syscall") else { continue }
            let fields = text.split(separator: " ")
            if fields.count > 1 && fields[0] == "1" && fields[1] == "0x\(String(fd, radix: 16))" { return true }
        }
        return false
    }

    /// Number of open file descriptors.
    public static func openFDs(_ pid: pid_t) -> Int {
        guard let d = opendir("/proc/\(pid)/fd") else { return 0 }
        defer { closedir(d) }
        var n = 0
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { n += 1 }
        }
        return n
    }

    /// Samples `value` every 50 ms until it has not grown for `quiet` seconds (or `timeout`
    /// passes); returns the largest value seen.
    public static func peakAfterSettling(quiet: Double = 0.5, timeout: Double = 8, _ value: () -> Int) -> Int {
        let deadline = Subprocess.now() + timeout
        var peak = value()
        var lastGrowth = Subprocess.now()
        while Subprocess.now() < deadline && Subprocess.now() - lastGrowth < quiet {
            usleep(50_000)
            let v = value()
            if v > peak {
                peak = v
                lastGrowth = Subprocess.now()
            }
        }
        return peak
    }
}

extension RawNBDClient {
    /// Makes the socket non-blocking (or blocking again).
    public func setNonBlocking(_ on: Bool) {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK)
    }

    /// Sends `bytes` without ever blocking, until all are sent or the peer has taken nothing
    /// for `stall` seconds; returns the bytes sent.
    public func sendUntilStalled(_ bytes: [UInt8], stall: Double) -> Int {
        setNonBlocking(true)
        defer { setNonBlocking(false) }
        var sent = 0
        var stalledSince: Double?
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, min(1 << 20, $0.count - sent), Int32(MSG_NOSIGNAL)) }
            if n > 0 {
                sent += n
                stalledSince = nil
                continue
            }
            if n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR { break }
            let now = Subprocess.now()
            if let since = stalledSince {
                if now - since > stall { break }
            } else {
                stalledSince = now
            }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            _ = poll(&p, 1, 20)
        }
        return sent
    }

    /// Seconds a fresh client takes to connect, negotiate and read 4 KiB from `export`.
    public static func probe(unixPath: String, export: String) throws -> Double {
        let start = Subprocess.now()
        let c = try RawNBDClient(unixPath: unixPath)
        try c.connect(export: export)
        let r = try c.read(offset: 0, length: 4096)
        let elapsed = Subprocess.now() - start
        guard r.error == 0 else { throw HarnessError("probe read failed: \(r.error)") }
        try c.disconnect()
        return elapsed
    }
}
