import Glibc
import Transport

/// `hw:CARD,DEV`: an ALSA hardware PCM through the kernel's PCM interface. Not in this build yet: the factory
/// refuses it with a clear message (see the README's sound paragraph).
public final class AlsaPcmEndpoint {
    public init(card: Int, device: Int, playback: Bool) throws(DeviceError) {
        throw DeviceError("hw:\(card),\(device): ALSA hardware PCMs are not supported in this build yet (use null or wav:)")
    }
}
