/// QAPI `JobStatus` (`qapi/job.json`): the states of QEMU's job model.
public enum JobStatus: String, Sendable, CaseIterable {
    case undefined, created, running, paused, ready, standby, waiting, pending, aborting, concluded, null

    var index: Int { JobStatus.allCases.firstIndex(of: self)! }
}

/// QAPI `JobVerb`: what a user may ask of a job.
public enum JobVerb: String, Sendable, CaseIterable {
    case cancel, pause, resume, setSpeed = "set-speed", complete, finalize, dismiss, change

    var index: Int { JobVerb.allCases.firstIndex(of: self)! }
}

/// QEMU's `JobSTT` and `JobVerbTable` (`job.c`), as data.
public enum JobStateMachine {
    //                                U  C  R  P  Y  S  W  D  X  E  N
    private static let transitions: [[UInt8]] = [
        /* U */ [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        /* C */ [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
        /* R */ [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
        /* P */ [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        /* Y */ [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
        /* S */ [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        /* W */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        /* D */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        /* X */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        /* E */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        /* N */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    //                                U  C  R  P  Y  S  W  D  X  E  N
    private static let verbs: [[UInt8]] = [
        /* cancel    */ [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        /* pause     */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        /* resume    */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        /* set-speed */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        /* complete  */ [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        /* finalize  */ [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        /* dismiss   */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        /* change    */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    ]

    public static func canTransition(from: JobStatus, to: JobStatus) -> Bool {
        transitions[from.index][to.index] == 1
    }

    public static func allows(_ verb: JobVerb, in status: JobStatus) -> Bool {
        verbs[verb.index][status.index] == 1
    }
}

/// QAPI `BlockdevOnError`.
public enum OnError: String, Sendable, CaseIterable {
    case report, ignore, enospc, stop, auto
}

/// An error for the QMP layer: `DeviceNotActive` for unknown block jobs, otherwise generic.
public struct JobError: Error, Sendable, CustomStringConvertible, Equatable {
    public enum Kind: Sendable, Equatable { case generic, deviceNotActive }
    public let kind: Kind
    public let message: String
    public init(_ message: String, kind: Kind = .generic) {
        self.kind = kind
        self.message = message
    }
    public var description: String { message }
}
