import XCTest
@testable import Registry

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

final class TOMLTests: XCTestCase {
    // MARK: Helpers

    private func parse(_ text: String, file: StaticString = #filePath, line: UInt = #line) -> TOMLDocument? {
        do throws(ConfigError) {
            return try TOML.parse(text, file: "t.toml")
        } catch {
            XCTFail("unexpected error: \(error)", file: file, line: line)
            return nil
        }
    }

    private func parseError(_ bytes: [UInt8]) -> ConfigError? {
        do throws(ConfigError) {
            _ = try TOML.parse(bytes: bytes, file: "t.toml")
            return nil
        } catch {
            return error
        }
    }

    /// Asserts that `text` is rejected at `line` with a message containing `fragment`.
    @discardableResult
    private func assertRejects(_ text: String, at expectedLine: Int, _ fragment: String, key: String? = nil,
                               file: StaticString = #filePath, line: UInt = #line) -> ConfigError? {
        assertRejects(bytes: Array(text.utf8), at: expectedLine, fragment, key: key, file: file, line: line)
    }

    @discardableResult
    private func assertRejects(bytes: [UInt8], at expectedLine: Int, _ fragment: String, key: String? = nil,
                               file: StaticString = #filePath, line: UInt = #line) -> ConfigError? {
        guard let error = parseError(bytes) else {
            XCTFail("expected an error containing \"\(fragment)\"", file: file, line: line)
            return nil
        }
        XCTAssertEqual(error.file, "t.toml", file: file, line: line)
        XCTAssertEqual(error.line, expectedLine, "\(error)", file: file, line: line)
        XCTAssertTrue(error.message.contains(fragment), "\(error)", file: file, line: line)
        if let key { XCTAssertEqual(error.key, key, "\(error)", file: file, line: line) }
        return error
    }

    private func reader(_ text: String, table index: Int = 1) -> OptionReader? {
        guard let doc = parse(text), index < doc.tables.count else { return nil }
        return OptionReader(table: doc.tables[index], file: doc.file)
    }

    private func readerError(_ body: () throws(ConfigError) -> Void) -> ConfigError? {
        do throws(ConfigError) {
            try body()
            return nil
        } catch {
            return error
        }
    }

    // MARK: Accepted documents

    func testEmptyDocumentHasRootTable() {
        for text in ["", "\n\n", "# only a comment\n   \n\t# another\n", "\u{FEFF}# BOM\n"] {
            XCTAssertEqual(parse(text), TOMLDocument(file: "t.toml", tables: [TOMLTable(name: [], line: 0, entries: [])]))
        }
    }

    func testEveryFormInOneDocument() {
        let text = """
            # loopbackd configuration
            name = "host" # trailing comment
            quoted-key_1 = 'C:\\path\\no escapes'

            [server]
            port = 8080
            negative = -17
            plus = +5
            big = 1_000_000
            hex = 0xDEAD_beef
            octal = 0o755
            binary = 0b1010
            max = 9223372036854775807
            min = -9223372036854775808
            zero = 0
            yes = true
            no = false

            [device.rng0]
            escapes = "q\\" b\\\\ n\\n t\\t u\\u00e9 U\\U0001F600 \\b\\f\\r"
            hash = "not # a comment"
            literal_hash = 'also # not'
            tab = "a\tb"
            utf8 = "héllo ✓"
            empty = ""
            ints = [1, 2, 3]
            strs = ["a", 'b', "c,]"]   # comment after array
            trailing = [ true, false, ]
            none = []
            "quoted key" = 1

            [ device . "my disk" ]
            \tpath = "/dev/null"\t
            """
        guard let doc = parse(text) else { return }
        XCTAssertEqual(doc.tables.map(\.name), [[], ["server"], ["device", "rng0"], ["device", "my disk"]])
        XCTAssertEqual(doc.tables.map(\.line), [0, 5, 19, 32])
        XCTAssertEqual(doc.tables[0].entries, [
            TOMLEntry(key: "name", value: .string("host"), line: 2),
            TOMLEntry(key: "quoted-key_1", value: .string("C:\\path\\no escapes"), line: 3),
        ])
        XCTAssertEqual(doc.tables[1].entries.map(\.value), [
            .integer(8080), .integer(-17), .integer(5), .integer(1_000_000), .integer(0xDEAD_BEEF),
            .integer(0o755), .integer(0b1010), .integer(Int64.max), .integer(Int64.min), .integer(0),
            .bool(true), .bool(false),
        ])
        XCTAssertEqual(doc.tables[1].entries.map(\.line), Array(6...17))
        XCTAssertEqual(doc.tables[2].entries.map(\.value), [
            .string("q\" b\\ n\n t\t u\u{E9} U\u{1F600} \u{8}\u{C}\r"),
            .string("not # a comment"),
            .string("also # not"),
            .string("a\tb"),
            .string("héllo ✓"),
            .string(""),
            .array([.integer(1), .integer(2), .integer(3)]),
            .array([.string("a"), .string("b"), .string("c,]")]),
            .array([.bool(true), .bool(false)]),
            .array([]),
            .integer(1),
        ])
        XCTAssertEqual(doc.tables[2].entries.last?.key, "quoted key")
        XCTAssertEqual(doc.tables[3].entries, [TOMLEntry(key: "path", value: .string("/dev/null"), line: 33)])
    }

    func testCRLFLineEndings() {
        let doc = parse("a = 1\r\n[t]\r\nb = 'x'\r\n")
        XCTAssertEqual(doc?.tables[0].entries, [TOMLEntry(key: "a", value: .integer(1), line: 1)])
        XCTAssertEqual(doc?.tables[1].entries, [TOMLEntry(key: "b", value: .string("x"), line: 3)])
    }

    func testSuperTableAfterSubTableIsAllowed() {
        XCTAssertEqual(parse("[a.b]\nx = 1\n[a]\ny = 2\n")?.tables.map(\.name), [[], ["a", "b"], ["a"]])
    }

    func testQuotedAndBareKeysAreTheSameKey() {
        assertRejects("a = 1\n\"a\" = 2\n", at: 2, "duplicate key (first defined on line 1)", key: "a")
    }

    // MARK: Rejections

    func testDuplicateKeys() {
        assertRejects("a = 1\nb = 2\na = 3\n", at: 3, "duplicate key (first defined on line 1)", key: "a")
        let e = assertRejects("[server]\nport = 1\n\nport = 2\n", at: 4, "duplicate key", key: "server.port")
        XCTAssertEqual(e?.description, "t.toml:4: key 'server.port': duplicate key (first defined on line 2)")
        // Same key in different tables is fine.
        XCTAssertNotNil(parse("[a]\nx = 1\n[b]\nx = 1\n"))
    }

    func testDuplicateTables() {
        let e = assertRejects("[a]\nx = 1\n[b]\n[a]\n", at: 4, "duplicate table [a] (first defined on line 1)")
        XCTAssertNil(e?.key)
        assertRejects("[device.rng0]\n[device.\"rng0\"]\n", at: 2, "duplicate table [device.rng0]")
        assertRejects("[device.\"my disk\"]\n\n[device.'my disk']\n", at: 3, "duplicate table [device.\"my disk\"]")
    }

    func testKeyTableConflicts() {
        assertRejects("device = 1\n[device.rng0]\n", at: 2, "table [device.rng0] conflicts with key 'device' defined on line 1")
        assertRejects("[a.b]\n[a]\nb = 1\n", at: 3, "key conflicts with table [a.b] defined on line 1", key: "a.b")
    }

    func testUnterminatedStrings() {
        assertRejects("a = 1\nb = \"abc\n", at: 2, "unterminated string", key: "b")
        assertRejects("b = 'abc\nc = 1", at: 1, "unterminated string", key: "b")
        assertRejects("b = \"abc\\\"\n", at: 1, "unterminated string")
        assertRejects("b = \"abc\\", at: 1, "unterminated string")
        assertRejects("[\"abc]\n", at: 1, "unterminated string")
    }

    func testControlCharactersInStrings() {
        assertRejects("\na = \"x\u{1}y\"\n", at: 2, "control character U+0001 in string", key: "a")
        assertRejects("a = 'x\u{7F}'\n", at: 1, "control character U+007F in string")
        assertRejects("a = \"x\ry\"\n", at: 1, "control character U+000D in string")
        assertRejects("a = 1 # bell \u{7}\n", at: 1, "control character U+0007 in comment")
        assertRejects("a = 1\r\r\n", at: 1, "unexpected control character U+000D after value")
    }

    func testInvalidEscapes() {
        assertRejects("a = 1\n\nb = \"\\x41\"\n", at: 3, "invalid escape sequence '\\x'", key: "b")
        assertRejects("b = \"\\u12\"\n", at: 1, "\\u needs 4 hex digits")
        assertRejects("b = \"\\u12G4\"\n", at: 1, "\\u needs 4 hex digits")
        assertRejects("b = \"\\U0001F60\"\n", at: 1, "\\U needs 8 hex digits")
        assertRejects("b = \"\\uD800\"\n", at: 1, "U+D800 is not a Unicode scalar value")
        assertRejects("b = \"\\UFFFFFFFF\"\n", at: 1, "is not a Unicode scalar value")
        assertRejects("b = \"a\\ b\"\n", at: 1, "invalid escape sequence '\\ '")
        assertRejects("b = \"a\\\u{1}\"\n", at: 1, "invalid escape sequence: '\\' followed by control character U+0001")
    }

    func testTrailingGarbage() {
        assertRejects("a = 1 2\n", at: 1, "unexpected text after value: \"2\"", key: "a")
        assertRejects("\na = \"x\" y\n", at: 2, "unexpected text after value: \"y\"")
        assertRejects("a = [1] ]\n", at: 1, "unexpected text after value")
        assertRejects("[t] x = 1\n", at: 1, "unexpected text after table header: \"x = 1\"")
        assertRejects("[t]\nb = true false\n", at: 2, "unexpected text after value", key: "t.b")
        assertRejects("a = 12abc\n", at: 1, "invalid integer 12abc")
        assertRejects("a = truex\n", at: 1, "invalid value \"truex\"")
    }

    func testKeysWithoutValues() {
        assertRejects("a = 1\nb\n", at: 2, "key without value", key: "b")
        assertRejects("b # comment\n", at: 1, "key without value")
        assertRejects("b =\n", at: 1, "missing value after '='", key: "b")
        assertRejects("b =   # comment\n", at: 1, "missing value after '='")
        assertRejects("b : 1\n", at: 1, "expected '=' after key, found ':'")
        assertRejects("= 1\n", at: 1, "expected a key, found '='")
        assertRejects("a b = 1\n", at: 1, "expected '=' after key, found 'b'")
        assertRejects("é = 1\n", at: 1, "expected a key, found 'é'")
        assertRejects("\"\" = 1\n", at: 1, "unsupported TOML: empty keys")
    }

    func testBadValues() {
        assertRejects("a = hello\n", at: 1, "invalid value \"hello\": expected a quoted string", key: "a")
        assertRejects("a = True\n", at: 1, "invalid value \"True\"")
        assertRejects("a = -\n", at: 1, "invalid value \"-\"")
        assertRejects("a = [1,,2]\n", at: 1, "expected a value, found ','")
        assertRejects("a = [1 2]\n", at: 1, "expected ',' or ']' in array, found '2'")
        assertRejects("a = ,\n", at: 1, "expected a value, found ','")
    }

    func testInvalidIntegers() {
        assertRejects("a = 9223372036854775808\n", at: 1, "integer 9223372036854775808 is out of range", key: "a")
        assertRejects("a = -9223372036854775809\n", at: 1, "is out of range")
        assertRejects("\na = 0x8000000000000000\n", at: 2, "is out of range")
        assertRejects("a = 99999999999999999999999999\n", at: 1, "is out of range")
        assertRejects("a = 01\n", at: 1, "leading zeros are not allowed")
        assertRejects("a = -007\n", at: 1, "leading zeros are not allowed")
        assertRejects("a = 1__0\n", at: 1, "'_' must be between digits")
        assertRejects("a = 1_\n", at: 1, "'_' must be between digits")
        assertRejects("a = 0x_1\n", at: 1, "'_' must be between digits")
        assertRejects("a = _1\n", at: 1, "invalid value \"_1\"")
        assertRejects("a = +0x1\n", at: 1, "a sign is not allowed")
        assertRejects("a = 0x\n", at: 1, "no digits")
        assertRejects("a = 0xG\n", at: 1, "unexpected 'G'")
        assertRejects("a = 0b102\n", at: 1, "unexpected '2'")
        assertRejects("a = 0X1F\n", at: 1, "invalid integer 0X1F")
    }

    func testInvalidUTF8() {
        assertRejects(bytes: Array("a = 1\nb = 2\nc = \"".utf8) + [0xC3, 0x28] + Array("\"\n".utf8), at: 3, "invalid UTF-8")
        assertRejects(bytes: Array("# \n# ".utf8) + [0xC0, 0x80], at: 2, "invalid UTF-8")  // overlong NUL
        assertRejects(bytes: Array("a = 'x".utf8) + [0xE2, 0x9C], at: 1, "invalid UTF-8")  // truncated at EOF
        assertRejects(bytes: Array("a = '".utf8) + [0xED, 0xA0, 0x80, 0x27], at: 1, "invalid UTF-8")  // surrogate
        assertRejects(bytes: [0xFF], at: 1, "invalid UTF-8")
    }

    func testNULBytes() {
        let e = assertRejects(bytes: Array("a = 1\nb = \"x".utf8) + [0] + Array("\"\n".utf8), at: 2, "NUL byte in file")
        XCTAssertNil(e?.key)
        assertRejects(bytes: Array("# x".utf8) + [0], at: 1, "NUL byte")
    }

    func testFileTooLarge() {
        let ok = [UInt8](repeating: UInt8(ascii: "\n"), count: TOML.maxFileSize)
        XCTAssertNil(parseError(ok))
        let e = assertRejects(bytes: ok + [0x0A], at: 0, "file is larger than the 1 MiB limit")
        XCTAssertEqual(e?.description, "t.toml: file is larger than the 1 MiB limit")
    }

    func testUnsupportedSyntax() {
        let cases: [(String, Int, String)] = [
            ("a = {x = 1}", 1, "unsupported TOML: inline tables"),
            ("a = \"\"\"\nmulti\n\"\"\"", 1, "unsupported TOML: multi-line strings"),
            ("a = '''x'''", 1, "unsupported TOML: multi-line strings"),
            ("\na = 1.5", 2, "unsupported TOML: floats (1.5)"),
            ("a = -2e10", 1, "unsupported TOML: floats"),
            ("a = 6.626e-34", 1, "unsupported TOML: floats"),
            ("a = inf", 1, "unsupported TOML: floats"),
            ("a = -nan", 1, "unsupported TOML: floats"),
            ("a = 1979-05-27", 1, "unsupported TOML: dates and times (1979-05-27)"),
            ("a = 1979-05-27T07:32:00Z", 1, "unsupported TOML: dates and times"),
            ("a = 1979-05-27 07:32:00", 1, "unsupported TOML: dates and times"),
            ("a = 07:32:00", 1, "unsupported TOML: dates and times"),
            ("[x]\n[[y]]", 2, "unsupported TOML: arrays of tables"),
            ("a.b = 1", 1, "unsupported TOML: dotted keys"),
            ("\"a\" . b = 1", 1, "unsupported TOML: dotted keys"),
            ("a = [\n1,\n]", 1, "unsupported TOML: multi-line arrays"),
            ("a = [1, 2 # comment\n]", 1, "unsupported TOML: multi-line arrays"),
            ("a = [[1], [2]]", 1, "unsupported TOML: nested arrays"),
            ("a = [1, \"x\"]", 1, "unsupported TOML: mixed-type arrays (an integer and a string)"),
            ("a = [{x = 1}]", 1, "unsupported TOML: inline tables"),
        ]
        for (text, line, fragment) in cases {
            let e = assertRejects(text, at: line, fragment)
            XCTAssertTrue(e?.message.hasPrefix("unsupported TOML: ") ?? false, "\(text): \(String(describing: e))")
        }
    }

    func testBadTableHeaders() {
        assertRejects("[]\n", at: 1, "empty table name")
        assertRejects("a = 1\n[a.]\n", at: 2, "expected a key, found ']'")
        assertRejects("[a b]\n", at: 1, "unexpected 'b' in table header")
        assertRejects("[a\n", at: 1, "unterminated table header")
        assertRejects("[a.b\n", at: 1, "unterminated table header")
    }

    func testErrorDescriptions() {
        XCTAssertEqual(ConfigError(file: "f", line: 3, key: "a.b", message: "m").description, "f:3: key 'a.b': m")
        XCTAssertEqual(ConfigError(file: "f", line: 3, message: "m").description, "f:3: m")
        XCTAssertEqual(ConfigError(file: "f", line: 0, message: "m").description, "f: m")
        XCTAssertEqual(ConfigError(file: "f", line: 0, key: "k", message: "m").description, "f: key 'k': m")
        XCTAssertEqual(TOML.dottedName(["device", "my disk", "a\"b"]), "device.\"my disk\".\"a\\\"b\"")
    }

    // MARK: load(path:)

    func testLoad() throws {
        let path = "/tmp/loopbackd-toml-test-\(getpid()).toml"
        let text = "[device.rng0]\nbackend = \"urandom\"\n"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { unlink(path) }
        XCTAssertEqual(Array(text.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }, text.utf8.count)
        close(fd)

        do throws(ConfigError) {
            let doc = try TOML.load(path: path)
            XCTAssertEqual(doc.file, path)
            XCTAssertEqual(doc.tables.last?.entries.first?.value, .string("urandom"))
        } catch {
            XCTFail("\(error)")
        }
    }

    func testLoadErrors() {
        func loadError(_ path: String) -> ConfigError? {
            do throws(ConfigError) {
                _ = try TOML.load(path: path)
                return nil
            } catch {
                return error
            }
        }
        XCTAssertEqual(loadError("/nonexistent/x.toml")?.description,
                       "/nonexistent/x.toml: cannot read /nonexistent/x.toml: No such file or directory (errno 2)")
        XCTAssertEqual(loadError("/tmp")?.message, "cannot read /tmp: Is a directory (errno 21)")
        XCTAssertEqual(loadError("/dev/zero")?.message, "file is larger than the 1 MiB limit")
    }

    // MARK: OptionReader

    private let deviceDoc = """
        top = 1
        [device.rng0]
        path = "/dev/urandom"
        queues = 4
        readonly = true
        mode = "fast"
        tags = ["a", "b"]
        """

    func testOptionReaderHappyPath() {
        guard var r = reader(deviceDoc) else { return }
        XCTAssertEqual(r.tableName, "device.rng0")
        let error = readerError { () throws(ConfigError) in
            XCTAssertEqual(try r.requiredString("path"), "/dev/urandom")
            XCTAssertEqual(try r.int("queues", range: 1...64), 4)
            XCTAssertEqual(try r.bool("readonly"), true)
            XCTAssertEqual(try r.oneOf("mode", ["fast", "slow"]), "fast")
            XCTAssertEqual(try r.strings("tags"), ["a", "b"])
            XCTAssertNil(try r.string("absent"))
            XCTAssertNil(try r.int("absent2", range: 0...1))
            XCTAssertNil(try r.bool("absent3"))
            XCTAssertNil(try r.oneOf("absent4", ["x"]))
            try r.finish()
        }
        XCTAssertNil(error)
        XCTAssertEqual(r.line(of: "queues"), 4)
        XCTAssertEqual(r.line(of: "absent"), 2)
    }

    func testOptionReaderMissingRequired() {
        guard var r = reader(deviceDoc) else { return }
        let e = readerError { () throws(ConfigError) in _ = try r.requiredString("socket") }
        XCTAssertEqual(e, ConfigError(file: "t.toml", line: 2, key: "device.rng0.socket", message: "missing required key"))
        XCTAssertEqual(e?.description, "t.toml:2: key 'device.rng0.socket': missing required key")

        guard var root = reader(deviceDoc, table: 0) else { return }
        XCTAssertEqual(readerError { () throws(ConfigError) in _ = try root.requiredString("name") }?.description,
                       "t.toml: key 'name': missing required key")
    }

    func testOptionReaderWrongType() {
        guard var r = reader(deviceDoc) else { return }
        XCTAssertEqual(readerError { () throws(ConfigError) in _ = try r.string("queues") },
                       ConfigError(file: "t.toml", line: 4, key: "device.rng0.queues", message: "expected a string, found an integer"))
        XCTAssertEqual(readerError { () throws(ConfigError) in _ = try r.int("path", range: 0...1) }?.message,
                       "expected an integer, found a string")
        XCTAssertEqual(readerError { () throws(ConfigError) in _ = try r.bool("mode") }?.message,
                       "expected a boolean, found a string")
        XCTAssertEqual(readerError { () throws(ConfigError) in _ = try r.requiredString("readonly") }?.message,
                       "expected a string, found a boolean")
        XCTAssertEqual(readerError { () throws(ConfigError) in _ = try r.oneOf("tags", ["a"]) }?.message,
                       "expected a string, found an array")
        XCTAssertEqual(readerError { () throws(ConfigError) in _ = try r.strings("path") }?.message,
                       "expected an array of strings, found a string")
        guard var ints = reader("[t]\nx = [1, 2]\n") else { return }
        XCTAssertEqual(readerError { () throws(ConfigError) in _ = try ints.strings("x") }?.message,
                       "expected an array of strings, found an array of integers")
    }

    func testOptionReaderOutOfRange() {
        guard var r = reader(deviceDoc) else { return }
        let e = readerError { () throws(ConfigError) in _ = try r.int("queues", range: 8...16) }
        XCTAssertEqual(e?.description, "t.toml:4: key 'device.rng0.queues': must be between 8 and 16, found 4")
    }

    func testOptionReaderOneOf() {
        guard var r = reader(deviceDoc) else { return }
        let e = readerError { () throws(ConfigError) in _ = try r.oneOf("mode", ["a", "b"]) }
        XCTAssertEqual(e?.line, 6)
        XCTAssertEqual(e?.message, "must be one of \"a\", \"b\"; found \"fast\"")
    }

    func testOptionReaderUnknownKey() {
        guard var r = reader(deviceDoc) else { return }
        let e = readerError { () throws(ConfigError) in
            _ = try r.string("path")
            _ = try r.bool("readonly")
            _ = try r.string("socket")
            try r.finish()
        }
        XCTAssertEqual(e?.description,
                       "t.toml:4: key 'device.rng0.queues': unknown key; accepted keys in [device.rng0]: path, readonly, socket")

        guard var root = reader(deviceDoc, table: 0) else { return }
        XCTAssertEqual(readerError { () throws(ConfigError) in try root.finish() }?.description,
                       "t.toml:1: key 'top': unknown key; no keys are accepted at the top level")
    }

    func testOptionReaderRejectsNUL() {
        guard var r = reader("[t]\np = \"a\\u0000b\"\n") else { return }
        XCTAssertEqual(readerError { () throws(ConfigError) in _ = try r.string("p") }?.message,
                       "must not contain NUL characters")
    }

    func testOptionReaderCallerError() {
        guard let r = reader(deviceDoc) else { return }
        XCTAssertEqual(r.error("path", "must be a socket").description,
                       "t.toml:3: key 'device.rng0.path': must be a socket")
    }

    // MARK: Fuzzing

    /// xorshift64: deterministic, so failures reproduce.
    private struct XorShift {
        var state: UInt64
        mutating func next() -> UInt64 {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            return state
        }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(n, 1))) }
    }

    private func checkNoCrash(_ bytes: [UInt8], file: StaticString = #filePath, line: UInt = #line) {
        guard let error = parseError(bytes) else { return }
        let lineCount = bytes.filter { $0 == 0x0A }.count + 1
        XCTAssertTrue((1...lineCount + 1).contains(error.line), "line \(error.line) of \(lineCount): \(error)",
                      file: file, line: line)
        XCTAssertFalse(error.message.isEmpty, file: file, line: line)
    }

    func testFuzzMutations() {
        let base = Array("""
            # comment
            name = "host\\u00e9\\n" # c
            lit = 'x\ty'
            [server]
            port = 0x1F_90
            n = -1_000
            ok = true
            list = ["a", 'b', ]
            ints = [1, 2, 3]
            [device."my disk"]
            path = "/dev/null"
            """.utf8)
        var rng = XorShift(state: 0x9E37_79B9_7F4A_7C15)
        let interesting: [UInt8] = Array("[]{}\"'\\=#.,_-+:0x\n\r\t ".utf8) + [0, 0x7F, 0xC3, 0xFF, 0xE2]
        for _ in 0..<4000 {
            var bytes = base
            for _ in 0...rng.below(3) {
                switch rng.below(5) {
                case 0 where !bytes.isEmpty:  // random byte flip
                    bytes[rng.below(bytes.count)] ^= UInt8(truncatingIfNeeded: 1 << rng.below(8))
                case 1:  // truncation
                    bytes.removeLast(rng.below(bytes.count + 1))
                case 2:  // insert a syntactically interesting byte
                    bytes.insert(interesting[rng.below(interesting.count)], at: rng.below(bytes.count + 1))
                case 3 where !bytes.isEmpty:  // delete a byte
                    bytes.remove(at: rng.below(bytes.count))
                default:  // overwrite with a random byte
                    if !bytes.isEmpty { bytes[rng.below(bytes.count)] = UInt8(truncatingIfNeeded: rng.next()) }
                }
            }
            checkNoCrash(bytes)
        }
    }

    func testFuzzRandomTokens() {
        let tokens = ["[", "]", "[[", "\"", "'", "\"\"\"", "=", " ", "#", "\n", ".", ",", "a", "b", "1", "0x", "-",
                      "_", "true", "\\", "\\u", "\\U", "D800", "{", "9223372036854775808", "é", "1.5", "1979-05-27"]
        var rng = XorShift(state: 42)
        for _ in 0..<3000 {
            var text = ""
            for _ in 0..<rng.below(30) { text += tokens[rng.below(tokens.count)] }
            checkNoCrash(Array(text.utf8))
        }
    }
}
