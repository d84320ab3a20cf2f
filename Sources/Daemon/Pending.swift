import Transport
import Registry

// Wiring points filled in by the vhost-user work; until then they refuse clearly.
func startServer(host: DeviceHost, index: Int, path: String) throws(DeviceError) -> AnyObject {
    throw DeviceError("serve: vhost-user backend server not built yet")
}
func makeFrontend(name: String, type: String, socket: String) throws(DeviceError) -> VirtioDevice {
    throw DeviceError("backend vhost-user: frontend not built yet")
}
enum AB { static func run(_ c: DaemonConfig, _ o: Options) -> Int32 { printErr("loopbackd: ab: not built yet"); return 1 } }
