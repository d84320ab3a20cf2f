import Transport

/// virtio-snd (virtio 1.2 §5.14): four queues (control, event, tx, rx), config { le32 jacks, streams, chmaps }.
/// Control requests start with a le32 code and are answered with a le32 status (plus, for the QUERY_INFO
/// requests, `count` items of `size` bytes); I/O messages are { le32 stream_id } + PCM data (tx: readable,
/// rx: writable) + { le32 status, le32 latency_bytes } at the end of the writable part.
public enum VirtioSnd {
    public static let deviceID: UInt32 = 25
    public static let configSize = 12
    public static let controlQueue = 0, eventQueue = 1, txQueue = 2, rxQueue = 3

    // Request codes.
    public static let rJackInfo: UInt32 = 1
    public static let rJackRemap: UInt32 = 2
    public static let rPcmInfo: UInt32 = 0x0100
    public static let rPcmSetParams: UInt32 = 0x0101
    public static let rPcmPrepare: UInt32 = 0x0102
    public static let rPcmRelease: UInt32 = 0x0103
    public static let rPcmStart: UInt32 = 0x0104
    public static let rPcmStop: UInt32 = 0x0105
    public static let rChmapInfo: UInt32 = 0x0200
    // Event codes.
    public static let evtJackConnected: UInt32 = 0x1000
    public static let evtJackDisconnected: UInt32 = 0x1001
    public static let evtPcmPeriodElapsed: UInt32 = 0x1100
    public static let evtPcmXrun: UInt32 = 0x1101
    // Status codes.
    public static let sOK: UInt32 = 0x8000
    public static let sBadMsg: UInt32 = 0x8001
    public static let sNotSupp: UInt32 = 0x8002
    public static let sIOErr: UInt32 = 0x8003

    /// Directions (pcm_info.direction, chmap_info.direction).
    public static let dOutput: UInt8 = 0, dInput: UInt8 = 1
    /// Jack features: VIRTIO_SND_JACK_F_REMAP.
    public static let jackFRemap: UInt32 = 1 << 0
    /// PCM stream features (bit numbers): SHMEM_HOST 0, SHMEM_GUEST 1, MSG_POLLING 2, EVT_SHMEM_PERIODS 3, EVT_XRUNS 4.
    public static let pcmFEvtXruns: UInt32 = 1 << 4

    // Structure sizes.
    public static let hdrSize = 4
    public static let queryInfoSize = 16          // hdr, start_id, count, size
    public static let jackInfoSize = 24           // hda_fn_nid, features, defconf, caps, connected, padding[7]
    public static let jackRemapSize = 16          // hdr, jack_id, association, sequence
    public static let pcmInfoSize = 32            // hda_fn_nid, features, formats, rates, direction, ch min/max, pad[5]
    public static let pcmHdrSize = 8              // hdr, stream_id
    public static let setParamsSize = 24          // pcm hdr, buffer_bytes, period_bytes, features, channels, format, rate, pad
    public static let chmapInfoSize = 24          // hda_fn_nid, direction, channels, positions[18]
    public static let xferSize = 4                // stream_id
    public static let statusSize = 8              // status, latency_bytes
    public static let eventSize = 8               // hdr, data
    public static let chmapMaxSize = 18

    /// PCM formats (VIRTIO_SND_PCM_FMT_*) by bit number.
    public enum Format: UInt8, CaseIterable, Sendable {
        case imaAdpcm = 0, muLaw, aLaw, s8, u8, s16, u16, s18_3, u18_3, s20_3, u20_3, s24_3, u24_3, s20, u20, s24, u24,
             s32, u32, float, float64, dsdU8, dsdU16, dsdU32, iec958Subframe
        /// Bytes one sample takes in memory (the physical width); 0 for IMA ADPCM (4 bits: not frame-addressable).
        public var bytes: Int {
            switch self {
            case .imaAdpcm: return 0
            case .muLaw, .aLaw, .s8, .u8, .dsdU8: return 1
            case .s16, .u16, .dsdU16: return 2
            case .s18_3, .u18_3, .s20_3, .u20_3, .s24_3, .u24_3: return 3
            case .s20, .u20, .s24, .u24, .s32, .u32, .float, .dsdU32, .iec958Subframe: return 4
            case .float64: return 8
            }
        }
        /// The byte a buffer of silence is made of (unsigned 8-bit formats centre on 0x80; the others on 0).
        public var silenceByte: UInt8 { self == .u8 ? 0x80 : 0 }
        public var bit: UInt64 { 1 << UInt64(rawValue) }
    }

    /// Frame rates (VIRTIO_SND_PCM_RATE_*) by bit number.
    public static let rates: [UInt32] = [5512, 8000, 11025, 16000, 22050, 32000, 44100, 48000, 64000, 88200, 96000,
                                         176400, 192000, 384000]
    public static func rateBit(_ hz: UInt32) -> UInt8? { rates.firstIndex(of: hz).map { UInt8($0) } }

    /// Channel positions (VIRTIO_SND_CHMAP_*) used by the default maps.
    public static let chmapMono: UInt8 = 2, chmapFL: UInt8 = 3, chmapFR: UInt8 = 4, chmapRL: UInt8 = 5, chmapRR: UInt8 = 6,
                      chmapFC: UInt8 = 7, chmapLFE: UInt8 = 8, chmapSL: UInt8 = 9, chmapSR: UInt8 = 10
    /// ALSA's usual order for 1-8 channels (mono; FL FR; FL FR FC; FL FR RL RR; + FC; + LFE; + ...).
    public static func defaultPositions(_ channels: Int) -> [UInt8] {
        switch channels {
        case 1: return [chmapMono]
        case 2: return [chmapFL, chmapFR]
        case 3: return [chmapFL, chmapFR, chmapFC]
        case 4: return [chmapFL, chmapFR, chmapRL, chmapRR]
        case 5: return [chmapFL, chmapFR, chmapRL, chmapRR, chmapFC]
        case 6: return [chmapFL, chmapFR, chmapRL, chmapRR, chmapFC, chmapLFE]
        case 7: return [chmapFL, chmapFR, chmapRL, chmapRR, chmapFC, chmapLFE, 11 /* RC */]
        default: return [chmapFL, chmapFR, chmapRL, chmapRR, chmapFC, chmapLFE, chmapSL, chmapSR] + Array(repeating: 0, count: max(0, channels - 8))
        }
    }

    /// The largest buffer a stream accepts in SET_PARAMS (Linux asks at most 160 ms at the widest format; 8 MiB
    /// also bounds what one held chain can make the device wait for).
    public static let maxBufferBytes: UInt32 = 8 << 20
}

/// The parameters of a stream after SET_PARAMS, already checked against what the stream offers.
public struct PcmParams: Equatable, Sendable {
    public var bufferBytes: UInt32
    public var periodBytes: UInt32
    public var features: UInt32
    public var channels: UInt8
    public var format: VirtioSnd.Format
    public var rate: UInt32
    public init(bufferBytes: UInt32, periodBytes: UInt32, features: UInt32 = 0, channels: UInt8,
                format: VirtioSnd.Format, rate: UInt32) {
        self.bufferBytes = bufferBytes; self.periodBytes = periodBytes; self.features = features
        self.channels = channels; self.format = format; self.rate = rate
    }
    public var frameBytes: Int { Int(channels) * format.bytes }
    public var bytesPerSecond: Int { frameBytes * Int(rate) }
    /// Whole frames of `ns` at the stream rate, in bytes.
    public func bytes(inNs ns: UInt64) -> UInt64 {
        let (hi, lo) = ns.multipliedFullWidth(by: UInt64(rate))
        let frames = UInt64(1_000_000_000).dividingFullWidth((hi, lo)).quotient
        return frames &* UInt64(frameBytes)
    }
    /// The first time (ns from the clock's base) at which `bytes` bytes are due: frames rounded up.
    public func ns(forBytes bytes: UInt64) -> UInt64 {
        let fb = UInt64(max(frameBytes, 1))
        let frames = (bytes + fb - 1) / fb
        let (hi, lo) = frames.multipliedFullWidth(by: 1_000_000_000)
        let r = UInt64(rate)
        let (q, rem) = r.dividingFullWidth((hi, lo))
        return rem == 0 ? q : q + 1
    }
}

/// What a stream's endpoint can do: the PCM_INFO it is described by.
public struct PcmCapabilities: Equatable, Sendable {
    public var formats: UInt64
    public var rates: UInt64
    public var channelsMin: UInt8
    public var channelsMax: UInt8
    public init(formats: UInt64, rates: UInt64, channelsMin: UInt8, channelsMax: UInt8) {
        self.formats = formats; self.rates = rates; self.channelsMin = channelsMin; self.channelsMax = channelsMax
    }
    /// Every rate virtio names.
    public static let allRates: UInt64 = (1 << UInt64(VirtioSnd.rates.count)) - 1
}
