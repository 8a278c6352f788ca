import Daemon
import Glibc

@main
struct BlockdMain {
    static func main() {
        let argv = Swift.CommandLine.arguments
        exit(Runner.main(argv0: argv.first ?? "blockd", arguments: Array(argv.dropFirst())))
    }
}
