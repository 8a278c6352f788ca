import FuzzTargets

/// libFuzzer entry: one input through `FuzzTargets.qcow2`. An oracle's finding is a crash, so
/// libFuzzer saves the input (put it in Fuzz/FailCases/qcow2/ once fixed).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ start: UnsafeRawPointer?, _ count: Int) -> CInt {
    let bytes = start.map { Array(UnsafeRawBufferPointer(start: $0, count: count)) } ?? []
    let problems = FuzzTargets.qcow2(bytes)
    if !problems.isEmpty {
        fatalError("FuzzQCOW2: " + problems.joined(separator: "\n"))
    }
    return 0
}

// SwiftPM links an executable's entry point as `<target>_main`; hand control to libFuzzer.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafeRawPointer?, Int) -> CInt
) -> CInt

@_cdecl("FuzzQCOW2_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    FuzzTargets.quiet()
    return LLVMFuzzerRunDriver(&argc, &argv, { fuzzOne($0, $1) })
}
