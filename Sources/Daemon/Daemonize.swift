import Glibc

/// QEMU's `qemu_write_pidfile`: create, lock (so a second daemon with the same file fails),
/// check the locked file is the one at the path, truncate, write `PID\n`. The lock lives as
/// long as the process.
struct PidFile {
    let fd: Int32
    /// Absolute path, for removing it after a `chdir("/")`.
    let path: String

    struct Failure: Error { let message: String }

    static func write(_ path: String) throws(Failure) -> PidFile {
        func errnoText() -> String { String(cString: strerror(errno)) }
        var fd: Int32
        while true {
            fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
            if fd < 0 { throw Failure(message: "Could not create '\(path)': \(errnoText())") }
            var b = stat()
            if fstat(fd, &b) < 0 {
                let m = "Cannot stat file: \(errnoText())"
                close(fd)
                throw Failure(message: m)
            }
            var lock = flock()
            lock.l_type = Int16(F_WRLCK)
            lock.l_whence = Int16(SEEK_SET)
            lock.l_len = 0
            if fcntl(fd, F_SETLK, &lock) != 0 {
                let m = "Cannot lock pid file: \(errnoText())"
                close(fd)
                throw Failure(message: m)
            }
            var a = stat()
            if stat(path, &a) < 0 || a.st_ino != b.st_ino {
                close(fd)   // raced with another daemon: try again
                continue
            }
            break
        }
        if ftruncate(fd, 0) < 0 {
            let m = "Failed to truncate pid file: \(String(cString: strerror(errno)))"
            unlink(path)
            close(fd)
            throw Failure(message: m)
        }
        let text = Array("\(getpid())\n".utf8)
        if text.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress!, $0.count) }) != text.count {
            unlink(path)
            close(fd)
            throw Failure(message: "Failed to write pid file")
        }
        var absolute = path
        if let resolved = realpath(path, nil) {
            absolute = String(cString: resolved)
            free(resolved)
        }
        return PidFile(fd: fd, path: absolute)
    }

    /// Removes the file (qemu-storage-daemon does at exit; qemu-nbd leaves it).
    func remove() {
        unlink(path)
        close(fd)
    }
}

/// `--daemonize` / `--fork`: the parent waits until the daemon says it is ready (exit 0) or
/// failed (exit 1, the error already printed on the terminal's stderr), so a script that runs
/// the command and then connects never races the daemon, and a failed start leaves nothing
/// running. The daemon runs in a new session, detached from the terminal once ready.
enum Daemonize {
    /// Held by the daemon until it is ready.
    struct Readiness {
        let pipe: Int32

        /// `chdir("/")`, stdio to /dev/null, and one zero byte to the waiting parent.
        func ready() {
            _ = chdir("/")
            let null = open("/dev/null", O_RDWR)
            if null >= 0 {
                dup2(null, 0)
                dup2(null, 1)
                dup2(null, 2)
                if null > 2 { close(null) }
            }
            var status: UInt8 = 0
            while Glibc.write(pipe, &status, 1) < 0 && errno == EINTR {}
            close(pipe)
        }
    }

    /// Forks twice (QEMU's `os_daemonize`). Returns in the daemon only; the original process
    /// exits with the daemon's verdict. Call before any thread is started. `restrictUmask`
    /// sets umask 027 as qemu-storage-daemon does (qemu-nbd's `--fork` keeps the umask).
    static func start(restrictUmask: Bool) -> Readiness {
        var fds: [Int32] = [-1, -1]
        if pipe(&fds) != 0 {
            Report.line("cannot create a pipe: \(String(cString: strerror(errno)))")
            exit(1)
        }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        let pid = fork()
        if pid < 0 {
            Report.line("Failed to fork: \(String(cString: strerror(errno)))")
            exit(1)
        }
        if pid > 0 {
            close(fds[1])
            var status: UInt8 = 1
            var n: Int
            repeat { n = Glibc.read(fds[0], &status, 1) } while n < 0 && errno == EINTR
            // Reap the intermediate child so it never lingers as a zombie.
            var ignored: Int32 = 0
            _ = waitpid(pid, &ignored, 0)
            exit(n == 1 && status == 0 ? 0 : 1)
        }
        close(fds[0])
        _ = setsid()
        let second = fork()
        if second < 0 { _exit(1) }
        if second > 0 { _exit(0) }
        if restrictUmask { umask(0o027) }
        signal(SIGTSTP, SIG_IGN)
        signal(SIGTTOU, SIG_IGN)
        signal(SIGTTIN, SIG_IGN)
        return Readiness(pipe: fds[1])
    }
}
