/// `type = "rng"`: the keys its table accepts (documented in loopbackd.conf(5); the reader enforces the list).
extension DeviceType {
    public static var rng: DeviceType {
        var t = DeviceType(name: "rng", keys: ["source", "queue-size"], factory: DeviceRegistry.makeRng,
                           workload: { d, _ in RngWorkload(d) })
        t.kernel = RngExposure()
        return t
    }
}
