import XCTest
@testable import Transport

/// `containsText` replaces the standard library's `String.contains(String)` (from _StringProcessing, not linked).
final class TextTests: XCTestCase {
    func testContainsText() {
        XCTAssertTrue("/sys/devices/virtio-lo/virtio3/input/input5".containsText("/devices/virtio-lo/"))
        XCTAssertFalse("/sys/devices/pci0000:00/input/input5".containsText("/devices/virtio-lo/"))
        XCTAssertTrue("abc".containsText(""))
        XCTAssertTrue("abc".containsText("abc"))
        XCTAssertFalse("ab".containsText("abc"))
        XCTAssertTrue("aaab".containsText("aab"))       // a partial match that fails must restart one byte later
        XCTAssertFalse("aaa".containsText("aab"))
        XCTAssertTrue("x/ü/y".containsText("ü/"))        // multi-byte scalars compare as their UTF-8 bytes
        XCTAssertTrue("line one\nline two"[...].containsText("two"))  // Substring too
    }
}
