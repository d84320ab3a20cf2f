// swift-tools-version: 6.0
// loopbackd: one static binary that is the virtio-loopback adapter and the device host.
import PackageDescription

// The executable is fully static (no glibc at run time); see README "Static binary".
let staticExecutable: [SwiftSetting] = [.unsafeFlags(["-static-executable"])]
let staticLink: [LinkerSetting] = [.unsafeFlags(["-static-executable"])]
// Release builds drop the dynamic exclusivity checks (a swift_beginAccess call per class-property access: ~15 per
// blk request, measured). All device and ring state is owned by one loop thread, so overlapping accesses cannot
// happen by construction; debug builds (the tests) keep the checks.
let hotPath: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]
// No target imports the standard library's _StringProcessing implicitly: that module and _RegexParser were 1.1 MB of
// the stripped static binary, linked for one `String.contains(String)`; `containsText` (Transport/System/Text.swift)
// replaces it and this flag keeps regex/string algorithms from creeping back in (they no longer compile).
let noStringProcessing: SwiftSetting = .unsafeFlags(["-Xfrontend", "-disable-implicit-string-processing-module-import"])
// Identical code folding: generic specialisations and witness thunks the compiler emits more than once (about 200 KB).
let foldIdentical: [LinkerSetting] = [.unsafeFlags(["-Xlinker", "--icf=all"], .when(configuration: .release))]

let package = Package(
    name: "loopbackd",
    products: [.executable(name: "loopbackd", targets: ["loopbackd"])],
    targets: [
        // Linux calls Glibc's module does not import (eventfd, memfd, epoll_event, CMSG, ioctl, pause, argv).
        .target(name: "CLinux", cSettings: [.define("_GNU_SOURCE")]),
        // io_uring through liburing (Debian's liburing-dev, linked statically into the binary).
        .target(name: "CURing", linkerSettings: [.linkedLibrary("uring")]),
        // GPIO chips through libgpiod 1.6 (Debian's libgpiod-dev, v1 chardev ABI), linked statically.
        .target(name: "CGpiod", linkerSettings: [.linkedLibrary("gpiod")]),
        .target(name: "Transport", dependencies: ["CLinux"], swiftSettings: hotPath + [noStringProcessing]),
        .target(name: "Registry", dependencies: ["Transport", "CLinux", "CURing", "CGpiod"], swiftSettings: hotPath + [noStringProcessing]),
        .target(name: "Daemon", dependencies: ["Registry", "Transport", "CLinux"], swiftSettings: hotPath + [noStringProcessing]),
        .executableTarget(name: "loopbackd", dependencies: ["Daemon"],
                          swiftSettings: staticExecutable + [noStringProcessing], linkerSettings: staticLink + foldIdentical),
        .testTarget(name: "TransportTests", dependencies: ["Transport", "CLinux"]),
        .testTarget(name: "RegistryTests", dependencies: ["Registry", "Transport", "CLinux", "CURing"]),
        // Test-only malloc counter (interposes malloc in the test executable).
        .target(name: "CMallocCounter", path: "Tests/CMallocCounter"),
        .testTarget(name: "DaemonTests", dependencies: ["Daemon", "Registry", "Transport", "CMallocCounter"]),
    ],
    swiftLanguageModes: [.v6]
)
