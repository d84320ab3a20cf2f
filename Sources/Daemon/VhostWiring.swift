import Glibc
import Transport
import Registry

/// `serve = PATH`: the in-process device body, served as a vhost-user backend (the server adds it to the host).
func startServer(host: DeviceHost, name: String, device: VirtioDevice, path: String) throws(DeviceError) -> VhostUserBackendServer {
    let s = VhostUserBackendServer(socketPath: path, host: host, name: name, device: device)
    do { try s.start() } catch { throw DeviceError("\(name): cannot serve on \(path): \(error)") }
    Log.info("\(name): serving vhost-user on \(path)")
    return s
}

/// `backend = "vhost-user:PATH"`: the device is forwarded to an external backend.
/// A type's front-end companion (a forwarded gpu's display server) is built here, on the device's loop's terms.
func makeFrontend(_ d: DeviceConfig, socket: String, loop: EventLoop, relay: Bool = false, replay: Bool? = nil) throws(DeviceError) -> VirtioDevice {
    let fe = try VhostUserFrontendDevice(socketPath: socket, deviceID: d.shape.deviceID, queueSizes: d.shape.queueSizes,
                                         configSize: d.shape.configSize, loop: loop, relay: relay, replay: replay ?? d.reconnectReplay)
    if let c = d.shape.companion {
        do { fe.companion = try c.make(loop) } catch {
            loop.executeAndWait { fe.shutdown() }
            throw DeviceError("\(d.name): \(error)")
        }
    }
    return fe
}
