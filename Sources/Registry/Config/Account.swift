import Glibc

/// `[daemon] user`: the account loopbackd drops to after start-up, read from /etc/passwd and /etc/group by this
/// parser, not through NSS (a static binary's getpwnam needs the host's libc modules at run time; a target's
/// system user lives in the files).
public struct Account: Equatable, Sendable {
    public var name: String
    public var uid: UInt32
    public var gid: UInt32
    /// Supplementary groups: the primary group plus every /etc/group entry that lists the user (as initgroups).
    public var groups: [UInt32]

    public static let passwdFile = "/etc/passwd"
    public static let groupFile = "/etc/group"

    /// The account `name` from the texts of /etc/passwd and /etc/group; nil when the name is not in passwd.
    public static func lookup(_ name: String, passwd: String, group: String) -> Account? {
        var found: Account?
        for line in passwd.split(separator: "\n", omittingEmptySubsequences: true) {
            let f = line.split(separator: ":", omittingEmptySubsequences: false)
            guard f.count >= 4, f[0] == name, let uid = UInt32(f[2]), let gid = UInt32(f[3]) else { continue }
            found = Account(name: name, uid: uid, gid: gid, groups: [gid])
            break
        }
        guard var a = found else { return nil }
        for line in group.split(separator: "\n", omittingEmptySubsequences: true) {
            let f = line.split(separator: ":", omittingEmptySubsequences: false)
            guard f.count >= 4, let gid = UInt32(f[2]) else { continue }
            if f[3].split(separator: ",").contains(where: { $0 == name }) && !a.groups.contains(gid) { a.groups.append(gid) }
        }
        return a
    }

    /// Reads the two files (a missing /etc/group means no supplementary groups).
    public static func lookup(_ name: String, passwdPath: String = passwdFile, groupPath: String = groupFile) -> Account? {
        guard let p = readText(passwdPath) else { return nil }
        return lookup(name, passwd: p, group: readText(groupPath) ?? "")
    }

    static func readText(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while bytes.count < 16 << 20 {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            bytes += buf[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
