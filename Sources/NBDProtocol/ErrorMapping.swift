#if canImport(Glibc)
import Glibc
#endif

extension NBDErrorCode {
    /// Maps an errno from the block layer to the wire, as nbdkit's `nbd_errno` does:
    /// `ENOTSUP` only reaches the client as such for a fast-zero request, `EOVERFLOW` only
    /// with `DF`; otherwise both become `EINVAL`.
    public static func from(errno: Int32, flags: CommandFlags = []) -> NBDErrorCode {
        switch errno {
        case 0: return .ok
        case EROFS, EPERM, EACCES: return .perm
        case EIO: return .io
        case ENOMEM: return .nomem
        case ENOSPC, EDQUOT, EFBIG: return .nospc
        case ESHUTDOWN: return .shutdown
        case ENOTSUP, EOPNOTSUPP: return flags.contains(.fastZero) ? .notsup : .inval
        case EOVERFLOW: return flags.contains(.df) ? .overflow : .inval
        default: return .inval
        }
    }
}
