import Daemon
import Glibc

@main
struct BlockdMain {
    static func main() {
        let args = Array(Swift.CommandLine.arguments.dropFirst())
        exit(Runner.run(args))
    }
}
