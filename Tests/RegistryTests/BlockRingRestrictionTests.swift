import XCTest
import Glibc
import CLinux
import CURing
@testable import Registry

/// blk's io_uring ring through the real shim (curing.c) accepts only what blk uses (issue 11 item 3): READV, WRITEV
/// and FSYNC without SQE flags; any other opcode, any IOSQE_* flag and every register op after enabling get -EACCES
/// (io_uring_register(2) IORING_REGISTER_RESTRICTIONS). Needs Linux 5.10+ (this host and the guests' 6.1/6.12).
final class BlockRingRestrictionTests: XCTestCase {
    // Kernel ABI numbers (include/uapi/linux/io_uring.h); curing.h keeps liburing's header away from Swift.
    private let opNOP: Int32 = 0, opREADV: Int32 = 1, opOPENAT: Int32 = 18, opREAD: Int32 = 22
    private let sqeAsync: UInt8 = 1 << 4                                            // IOSQE_ASYNC
    private let regFILES: UInt32 = 2, unregEVENTFD: UInt32 = 5, regPERSONALITY: UInt32 = 9
    private let path = "/tmp/loopbackd-uring-\(getpid())"
    override func tearDown() { unlink(path) }

    func testRingAcceptsOnlyBlkOperationsAndNoRegisterOp() throws {
        writeTestFile(path, size: 8192, byte: 0x5A)
        let fd = open(path, O_RDWR | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        let efd = lb_eventfd(0, 1)
        defer { close(efd) }
        var out: OpaquePointer? = nil
        XCTAssertEqual(lb_uring_create(8, efd, &out), 0)
        let ring = try XCTUnwrap(out)
        defer { lb_uring_destroy(ring) }
        XCTAssertNil(lb_uring_unrestricted(ring).map { String(cString: $0) }, "the kernel refused the restriction")

        var data: UInt64 = 0, res: Int32 = 0
        // What blk uses still works: WRITEV (RWF_DSYNC as blk's write-through sends it), READV, FSYNC(DATASYNC).
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buf.deallocate() }
        var iov = iovec(iov_base: buf, iov_len: 4096)
        memset(buf, 0xC3, 4096)
        XCTAssertEqual(lb_uring_writev(ring, fd, &iov, 1, 4096, 2 /* RWF_DSYNC */, 1), 0)
        XCTAssertEqual(lb_uring_wait(ring, &data, &res), 0)
        XCTAssertEqual(data, 1); XCTAssertEqual(res, 4096)
        memset(buf, 0, 4096)
        XCTAssertEqual(lb_uring_readv(ring, fd, &iov, 1, 0, 2), 0)
        XCTAssertEqual(lb_uring_wait(ring, &data, &res), 0)
        XCTAssertEqual(data, 2); XCTAssertEqual(res, 4096)
        XCTAssertEqual(buf.load(fromByteOffset: 4095, as: UInt8.self), 0x5A)
        XCTAssertEqual(lb_uring_readv(ring, fd, &iov, 1, 4096, 3), 0)
        XCTAssertEqual(lb_uring_wait(ring, &data, &res), 0)
        XCTAssertEqual(res, 4096); XCTAssertEqual(buf.load(as: UInt8.self), 0xC3)
        XCTAssertEqual(lb_uring_fdatasync(ring, fd, 4), 0)
        XCTAssertEqual(lb_uring_wait(ring, &data, &res), 0)
        XCTAssertEqual(data, 4); XCTAssertEqual(res, 0)

        // Anything else completes with -EACCES. OPENAT of a file this process can open (an fd without the
        // restriction), NOP, SENDMSG-class ops, and blk's own READV with an SQE flag (IOSQE_ASYNC).
        let accessDenied = -EACCES
        let openat = path.withCString { lb_uring_test_op(ring, opOPENAT, AT_FDCWD, $0, 0, 0,
                                                         UInt32(O_RDONLY | O_CLOEXEC), 0) }
        if openat >= 0 { close(openat) }
        XCTAssertEqual(openat, accessDenied, "IORING_OP_OPENAT")
        XCTAssertEqual(lb_uring_test_op(ring, opNOP, -1, nil, 0, 0, 0, 0), accessDenied, "NOP")
        XCTAssertEqual(lb_uring_test_op(ring, opREAD, fd, buf, 4096, 0, 0, 0), accessDenied,
                       "IORING_OP_READ (not READV)")
        XCTAssertEqual(lb_uring_test_op(ring, opREADV, fd, &iov, 1, 0, 0, sqeAsync),
                       accessDenied, "READV with IOSQE_ASYNC")
        XCTAssertEqual(lb_uring_test_op(ring, opREADV, fd, &iov, 1, 0, 0, 0), 4096,
                       "the same READV without the flag")

        // No register op after enabling: a personality (a credential to submit under) or dropping the eventfd.
        XCTAssertEqual(lb_uring_test_register(ring, regPERSONALITY, nil, 0), accessDenied)
        XCTAssertEqual(lb_uring_test_register(ring, unregEVENTFD, nil, 0), accessDenied)
        var one: Int32 = efd
        XCTAssertEqual(lb_uring_test_register(ring, regFILES, &one, 1), accessDenied)
    }

    func testBlockDeviceRingIsRestricted() throws {
        writeTestFile(path, size: 4096, byte: 0)
        let dev = try BlockDevice(path: path, readOnly: false, queues: 1, queueSize: 64)
        XCTAssertTrue(dev.ioUringRestricted)
    }
}
