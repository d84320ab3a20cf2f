/// Substring search without the standard library's `_StringProcessing` module. That module (with `_RegexParser`)
/// is about 1 MB of the static binary and is linked only if code calls its algorithms (`String.contains(String)`,
/// `split(separator: String)`, `replacing`, regex); the package builds with
/// `-disable-implicit-string-processing-module-import` (Package.swift) so that none can creep back in.
extension StringProtocol {
    /// True if `needle` occurs in `self` (byte-wise on UTF-8: a match of whole scalars, which is what every caller
    /// — paths, sysfs and config words — needs).
    public func containsText(_ needle: String) -> Bool {
        let n = Array(needle.utf8)
        if n.isEmpty { return true }
        let h = Array(self.utf8)
        guard h.count >= n.count else { return false }
        var i = 0
        while i + n.count <= h.count {
            if h[i] == n[0] {
                var j = 1
                while j < n.count && h[i + j] == n[j] { j += 1 }
                if j == n.count { return true }
            }
            i += 1
        }
        return false
    }
}
