import Glibc
import Transport

/// `type = "sound"` (virtio-snd, virtio 1.2 §5.14): the keys its table accepts (documented in loopbackd.conf(5);
/// the reader enforces the list).
///   playback     endpoint of the playback stream: "null", "wav:/path/out.wav", "hw:CARD,DEV" (ALSA hardware PCM)
///   capture      endpoint of the capture stream: "null", "wav:/path/in.wav", "hw:CARD,DEV"
///                (at least one of the two; each present one is a stream, with a jack and a channel map)
///   channels     1-8, default 2: the most channels a null or WAV-sink stream offers
///   xrun-events  bool, default false: offer VIRTIO_SND_PCM_F_EVT_XRUNS (the driver hears of underruns)
///   queue-size   power of two 2-1024, default 64 (all four queues); forwarded 1-32768, default 256
///   queues       forwarded only: 1-64, default 4
/// Forwarded (`backend = "vhost-user:…"`): the back-end has the endpoints; only `queue-size` and `queues` apply.
extension DeviceType {
    public static var sound: DeviceType {
        DeviceType(name: "sound", keys: ["playback", "capture", "channels", "xrun-events", "queue-size", "queues"],
                   factory: makeSound, workload: { d, _ in SoundWorkload(d) })
    }

    static func makeSound(_ name: String, _ r: inout OptionReader, _ backend: DeviceBackend) throws(ConfigError)
        -> (DeviceShape, () throws(DeviceError) -> VirtioDevice) {
        let playback = try r.string("playback")
        let capture = try r.string("capture")
        let channels = try r.int("channels", range: 1...8)
        let xrunEvents = try r.bool("xrun-events")
        // In-process: 2-1024, default 64; forwarded: the forwarded types' 1-32768, default 256.
        let qs = try backend == .inproc ? r.int("queue-size", range: 2...1024) ?? 64 : r.int("queue-size", range: 1...32768) ?? 256
        if qs & (qs - 1) != 0 { throw r.error("queue-size", "must be a power of two, found \(qs)") }
        let queues = try r.int("queues", range: 1...64)
        let size = UInt16(qs)
        guard backend == .inproc else {
            for (k, v) in [("playback", playback != nil), ("capture", capture != nil), ("channels", channels != nil),
                           ("xrun-events", xrunEvents != nil)] where v {
                throw r.error(k, "a forwarded sound device's streams are its vhost-user back-end's; only queue-size and queues apply")
            }
            let shape = DeviceShape(deviceID: VirtioSnd.deviceID, queueSizes: Array(repeating: size, count: Int(queues ?? 4)),
                                    configSize: VirtioSnd.configSize)
            return (shape, { () throws(DeviceError) -> VirtioDevice in throw DeviceError("\(name): forwarded sound has no in-process body") })
        }
        if queues != nil { throw r.error("queues", "only for a forwarded sound device; in-process it has the spec's 4 queues") }
        guard playback != nil || capture != nil else {
            throw r.error("playback", "a sound device needs a stream: playback = \"null\" | \"wav:/path\" | \"hw:CARD,DEV\" and/or capture = ...")
        }
        var specs: [(UInt8, SoundEndpointSpec)] = []
        for (key, value, dir) in [("playback", playback, VirtioSnd.dOutput), ("capture", capture, VirtioSnd.dInput)] {
            guard let value else { continue }
            switch SoundEndpointSpec.parse(value) {
            case .success(let s): specs.append((dir, s))
            case .failure(let e): throw r.error(key, e.description)
            }
        }
        if specs.count == 2, case .wav(let a) = specs[0].1, case .wav(let b) = specs[1].1, a == b {
            throw r.error("capture", "the capture file is the playback file (\(a))")
        }
        let ch = UInt8(channels ?? 2), xe = xrunEvents ?? false
        let shape = DeviceShape(deviceID: VirtioSnd.deviceID, queueSizes: [size, size, size, size], configSize: VirtioSnd.configSize)
        return (shape, { () throws(DeviceError) -> VirtioDevice in
            var streams: [SoundStreamConfig] = []
            for (dir, spec) in specs {
                do throws(DeviceError) { streams.append(SoundStreamConfig(direction: dir, endpoint: try spec.open(direction: dir, channels: ch))) }
                catch { throw DeviceError("\(name): \(dir == VirtioSnd.dOutput ? "playback" : "capture"): \(error)") }
            }
            return SoundDevice(streams: streams, queueSize: size, xrunEvents: xe)
        })
    }
}

/// A stream's endpoint as written in the config.
public enum SoundEndpointSpec: Equatable, Sendable {
    case null
    case wav(String)
    case hw(card: Int, device: Int)

    public static func parse(_ s: String) -> Result<SoundEndpointSpec, DeviceError> {
        if s == "null" { return .success(.null) }
        if s.hasPrefix("wav:") {
            let p = String(s.dropFirst(4))
            guard p.hasPrefix("/") else { return .failure(DeviceError("the WAV file must be an absolute path")) }
            return .success(.wav(p))
        }
        if s.hasPrefix("hw:") {
            let parts = s.dropFirst(3).split(separator: ",", omittingEmptySubsequences: false)
            guard parts.count == 2, let c = Int(parts[0]), let d = Int(parts[1]), (0..<32).contains(c), (0..<32).contains(d) else {
                return .failure(DeviceError("an ALSA hardware PCM is hw:CARD,DEV with numbers 0-31 (e.g. hw:0,0), found \"\(s)\""))
            }
            return .success(.hw(card: c, device: d))
        }
        return .failure(DeviceError("unknown endpoint \"\(s)\"; use \"null\", \"wav:/path.wav\" or \"hw:CARD,DEV\""))
    }

    func open(direction: UInt8, channels: UInt8) throws(DeviceError) -> SoundEndpoint {
        switch self {
        case .null: return NullSoundEndpoint(channelsMax: channels)
        case .wav(let path):
            if direction == VirtioSnd.dOutput { return WavSinkEndpoint(path: path, channelsMax: channels) }
            return try WavSourceEndpoint(path: path)
        case .hw(let card, let device):
            return try AlsaPcmEndpoint(card: card, device: device, playback: direction == VirtioSnd.dOutput)
        }
    }
}
