import BlockDrivers

extension Daemon {
    /// Registers the format and filter drivers that live outside the factory's core switch.
    static func registerDrivers() {
        registerFormats()
        registerFilters()
        registerBackupDrivers()
        registerNBD()
        registerRBD()
    }
}
