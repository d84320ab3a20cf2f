/// `type = "blk"`: the keys its table accepts (documented in loopbackd.conf(5); the reader enforces the list).
extension DeviceType {
    public static var blk: DeviceType {
        var t = DeviceType(name: "blk", keys: ["path", "create-mib", "readonly", "queues", "queue-size"], factory: DeviceRegistry.makeBlk,
                           workload: { d, verify in BlkWorkload(d, verify: verify) })
        t.kernel = BlockExposure()
        return t
    }
}
