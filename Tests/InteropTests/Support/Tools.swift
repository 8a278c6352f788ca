// Requirements (`.requires("nbdinfo")`, `require(.device("/dev/fuse"))`), `Tools` and
// `waitUntil` come from the shared TestSupport target, visible to every file of this target.
@_exported import TestSupport
