public enum Daemon {
    public static func main() -> Int32 { 0 }
}
