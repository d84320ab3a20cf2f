import Glibc

/// A joinable POSIX thread running a closure (no Dispatch, no Foundation).
public struct Thread: @unchecked Sendable {
    let handle: pthread_t
    public static func spawn(_ body: @escaping @Sendable () -> Void) -> Thread {
        let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
        var t = pthread_t()
        let r = pthread_create(&t, nil, threadMain, box)
        precondition(r == 0, "pthread_create failed: \(r)")
        return Thread(handle: t)
    }
    public func join() { pthread_join(handle, nil) }
}

private final class ThreadBody {
    let body: @Sendable () -> Void
    init(_ b: @escaping @Sendable () -> Void) { body = b }
}

// A global function: Swift 6 closures from main-actor code crash as pthread entry points (machine notes).
private func threadMain(_ ctx: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    Unmanaged<ThreadBody>.fromOpaque(ctx!).takeRetainedValue().body()
    return nil
}
