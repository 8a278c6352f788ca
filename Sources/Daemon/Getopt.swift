/// GNU `getopt_long` as qemu-nbd and qemu-storage-daemon use it, so that command lines are
/// split the same way and mistakes get the same messages (glibc's wording):
///
/// - short options cluster (`-rt`), and take their argument attached or next (`-p10809`, `-p 10809`);
/// - long options take `--name=value` or `--name value`, and may be shortened to any unique
///   prefix (`--persist`);
/// - without `inOrder`, arguments that are not options are collected and returned after the
///   options (GNU permutation); with it (QSD's leading `-`), each is returned where it stands;
/// - `--` ends the options.
struct Getopt {
    struct LongOption {
        var name: String
        var takesArgument: Bool
        /// The option it stands for: its short letter, or its own name for long-only options.
        var key: String
    }

    enum Item: Equatable {
        /// An option with its argument, and the words it came from (for error locations).
        case option(key: String, argument: String?, words: [String])
        /// A non-option argument (only with `inOrder`; otherwise see `operands`).
        case operand(String)
    }

    enum Failure: Error, Equatable {
        /// glibc's message, printed after `argv[0]: ` (e.g. `unrecognized option '--frob'`).
        case message(String)
    }

    let shortOptions: [Character: Bool]   // letter → takes an argument
    let longOptions: [LongOption]
    let inOrder: Bool

    /// `spec` is getopt's string: letters, each followed by `:` when it takes an argument.
    init(short spec: String, long: [LongOption], inOrder: Bool = false) {
        var table: [Character: Bool] = [:]
        let chars = Array(spec)
        var i = 0
        while i < chars.count {
            let c = chars[i]
            let takes = i + 1 < chars.count && chars[i + 1] == ":"
            table[c] = takes
            i += takes ? 2 : 1
        }
        shortOptions = table
        longOptions = long
        self.inOrder = inOrder
    }

    /// Splits `args` (without argv[0]). Returns the options in order and the operands.
    func parse(_ args: [String]) throws(Failure) -> (items: [Item], operands: [String]) {
        var items: [Item] = []
        var operands: [String] = []
        var i = 0
        while i < args.count {
            let word = args[i]
            if word == "--" {
                let rest = args[(i + 1)...]
                if inOrder { items += rest.map { .operand($0) } } else { operands += rest }
                break
            }
            if word.hasPrefix("--") {
                let body = word.dropFirst(2)
                let name: Substring
                var inline: String?
                if let eq = body.firstIndex(of: "=") {
                    name = body[..<eq]
                    inline = String(body[body.index(after: eq)...])
                } else {
                    name = body
                }
                let option = try findLong(String(name), word: word)
                if option.takesArgument {
                    if let inline {
                        items.append(.option(key: option.key, argument: inline, words: [word]))
                    } else if i + 1 < args.count {
                        items.append(.option(key: option.key, argument: args[i + 1], words: [word, args[i + 1]]))
                        i += 1
                    } else {
                        throw .message("option '--\(option.name)' requires an argument")
                    }
                } else {
                    if inline != nil { throw .message("option '--\(option.name)' doesn't allow an argument") }
                    items.append(.option(key: option.key, argument: nil, words: [word]))
                }
                i += 1
                continue
            }
            if word.hasPrefix("-") && word.count > 1 {
                let letters = Array(word.dropFirst())
                var j = 0
                while j < letters.count {
                    let c = letters[j]
                    guard let takes = shortOptions[c], c != ":" else {
                        throw .message("invalid option -- '\(c)'")
                    }
                    if takes {
                        if j + 1 < letters.count {
                            items.append(.option(key: String(c), argument: String(letters[(j + 1)...]), words: [word]))
                        } else if i + 1 < args.count {
                            items.append(.option(key: String(c), argument: args[i + 1], words: [word, args[i + 1]]))
                            i += 1
                        } else {
                            throw .message("option requires an argument -- '\(c)'")
                        }
                        break
                    }
                    items.append(.option(key: String(c), argument: nil, words: [word]))
                    j += 1
                }
                i += 1
                continue
            }
            if inOrder { items.append(.operand(word)) } else { operands.append(word) }
            i += 1
        }
        return (items, operands)
    }

    /// An exact name, or the one option the prefix abbreviates.
    private func findLong(_ name: String, word: String) throws(Failure) -> LongOption {
        if let exact = longOptions.first(where: { $0.name == name }) { return exact }
        let candidates = longOptions.filter { $0.name.hasPrefix(name) }
        if candidates.isEmpty { throw .message("unrecognized option '\(word)'") }
        // Several names for one option are not ambiguous (glibc compares what they set).
        let first = candidates[0]
        if candidates.allSatisfy({ $0.key == first.key && $0.takesArgument == first.takesArgument }) { return first }
        let list = candidates.map { "'--\($0.name)'" }.joined(separator: " ")
        throw .message("option '\(word)' is ambiguous; possibilities: \(list)")
    }
}
