import Glibc
import Transport

/// What a read or write on a console endpoint did.
public enum EndpointIO: Equatable {
    /// Moved this many bytes (> 0).
    case bytes(Int)
    /// Nothing now: the endpoint tells its delegate when it is readable or writable again.
    case wouldBlock
    /// The host side went away (a socket client closed): nothing moves until `connected` is reported again.
    case closed
}

/// The device side of an endpoint's events (the console device). Called on the loop thread.
public protocol ConsoleEndpointDelegate: AnyObject {
    /// Data may be readable (or the peer hung up: the next read says `.closed`).
    func endpointReadable(_ port: Int)
    /// A write that would have blocked may succeed now.
    func endpointWritable(_ port: Int)
    /// A host-side client connected (true) or went away without a read or write noticing (false).
    func endpointConnection(_ port: Int, connected: Bool)
}

/// The host side of one console port: a pty, a listening unix socket, stdio, an append-only file, or a fake.
/// Reads and writes never block (edge-triggered readiness: after `.wouldBlock` the endpoint calls the delegate
/// when it can move data again). All methods run on the loop thread.
public protocol ConsoleEndpoint: AnyObject {
    /// For logs: "pty /dev/pts/3", "unix:/run/x.sock", …
    var description: String { get }
    /// A host side is there to take output (a unix client connected; always true for pty, stdio, file).
    var isConnected: Bool { get }
    /// Starts watching its fds on `loop` and reporting to `delegate` with `port`. Called once; idempotent.
    func start(loop: EventLoop, port: Int, delegate: ConsoleEndpointDelegate) throws(DeviceError)
    /// Stops watching (the device goes away).
    func stop()
    /// Reads into `count` iovecs (host → driver).
    func read(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO
    /// Writes `count` iovecs (driver → host); may move fewer bytes than given.
    func write(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO
    /// Terminal size, if the endpoint is a terminal (pty, stdio on a tty): (cols, rows).
    var windowSize: (cols: UInt16, rows: UInt16)? { get }
}

/// An endpoint in memory, for unit tests and the simulated workload: `feed` queues bytes for the driver, output
/// is kept (`takeOutput`) or, with `echo`, fed straight back. `writeRoom` limits how many output bytes it takes
/// before it would block (a slow reader); `setRoom` reopens it. Fixed-size byte rings: no allocation per request.
public final class FakeConsoleEndpoint: ConsoleEndpoint {
    public var description: String { echo ? "echo" : "fake" }
    public private(set) var isConnected: Bool
    public let echo: Bool
    private unowned(unsafe) var delegate: ConsoleEndpointDelegate?
    private var port = 0
    private var input: ByteRing
    private var output: ByteRing
    /// Output bytes it takes before a write would block (Int.max: unlimited up to the ring).
    public private(set) var writeRoom: Int
    /// Reads and writes that returned `.wouldBlock` (the device backed off).
    public private(set) var readBlocks = 0, writeBlocks = 0
    /// Largest single read/write (to check the device hands over whole iovec lists).
    public private(set) var reads = 0, writes = 0

    public init(echo: Bool = false, capacity: Int = 4 << 20, writeRoom: Int = Int.max, connected: Bool = true) {
        self.echo = echo
        input = ByteRing(capacity: capacity)
        output = ByteRing(capacity: echo ? 1 : capacity)
        self.writeRoom = writeRoom
        isConnected = connected
    }

    public func start(loop: EventLoop, port: Int, delegate: ConsoleEndpointDelegate) throws(DeviceError) {
        self.port = port
        self.delegate = delegate
    }
    public func stop() { delegate = nil }
    public var windowSize: (cols: UInt16, rows: UInt16)? { size }
    public var size: (cols: UInt16, rows: UInt16)?

    /// Host → driver: queues `bytes` and tells the device (loop thread). Returns bytes queued.
    @discardableResult
    public func feed(_ bytes: UnsafeRawBufferPointer) -> Int {
        let n = input.push(bytes.baseAddress!, bytes.count)
        if n > 0 { delegate?.endpointReadable(port) }
        return n
    }
    @discardableResult
    public func feed(_ bytes: [UInt8]) -> Int { bytes.withUnsafeBytes { feed($0) } }
    public var pendingInput: Int { input.count }

    /// Output so far, emptied.
    public func takeOutput() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: output.count)
        out.withUnsafeMutableBytes { _ = output.pop(into: $0.baseAddress!, $0.count) }
        return out
    }
    public var outputCount: Int { output.count }

    /// A slow reader: take at most `room` more output bytes, then block; reports writable when `room` > 0.
    public func setRoom(_ room: Int) {
        writeRoom = room
        if room > 0 { delegate?.endpointWritable(port) }
    }

    /// A host-side client connects or leaves.
    public func setConnected(_ c: Bool) {
        guard c != isConnected else { return }
        isConnected = c
        delegate?.endpointConnection(port, connected: c)
    }

    public func read(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        guard isConnected else { return .closed }
        var done = 0
        for i in 0..<count {
            let n = input.pop(into: iov[i].iov_base!, iov[i].iov_len)
            done += n
            if n < iov[i].iov_len { break }
        }
        if done == 0 { readBlocks += 1; return .wouldBlock }
        reads += 1
        return .bytes(done)
    }

    public func write(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> EndpointIO {
        guard isConnected else { return .closed }
        var done = 0
        for i in 0..<count where writeRoom > 0 {
            let want = min(iov[i].iov_len, writeRoom)
            let n = echo ? input.push(iov[i].iov_base!, want) : output.push(iov[i].iov_base!, want)
            done += n
            if writeRoom != Int.max { writeRoom -= n }
            if n < iov[i].iov_len { break }
        }
        if done == 0 { writeBlocks += 1; return .wouldBlock }
        writes += 1
        if echo { delegate?.endpointReadable(port) }
        return .bytes(done)
    }
}

/// A fixed-capacity byte FIFO (no allocation after init).
struct ByteRing: ~Copyable {
    let buf: UnsafeMutableRawPointer
    let capacity: Int
    var head = 0
    private(set) var count = 0
    init(capacity: Int) { self.capacity = max(capacity, 1); buf = .allocate(byteCount: self.capacity, alignment: 16) }
    deinit { buf.deallocate() }

    mutating func push(_ src: UnsafeRawPointer, _ n0: Int) -> Int {
        let n = min(n0, capacity - count)
        var done = 0
        while done < n {
            let at = (head + count) % capacity
            let k = min(n - done, capacity - at)
            (buf + at).copyMemory(from: src + done, byteCount: k)
            count += k
            done += k
        }
        return n
    }
    mutating func pop(into dst: UnsafeMutableRawPointer, _ n0: Int) -> Int {
        let n = min(n0, count)
        var done = 0
        while done < n {
            let k = min(n - done, capacity - head)
            (dst + done).copyMemory(from: buf + head, byteCount: k)
            head = (head + k) % capacity
            count -= k
            done += k
        }
        return n
    }
}
