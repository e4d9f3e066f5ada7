//! Generic-netlink messages for the kernel's `nbd` family
//! (`uapi/linux/nbd-netlink.h`), built and parsed without I/O.
//!
//! Netlink headers and attributes are in host byte order.

use std::os::fd::RawFd;

/// `NLMSG_ERROR`: an error (or, with error 0, an ack).
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 4;
/// Nested attribute flag.
pub const NLA_F_NESTED: u16 = 1 << 15;

/// The generic-netlink controller family.
pub const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_GETFAMILY`.
pub const CTRL_CMD_GETFAMILY: u8 = 3;
/// `CTRL_ATTR_FAMILY_ID` (u16).
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// `CTRL_ATTR_FAMILY_NAME` (string).
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// Name of the nbd generic-netlink family.
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
/// Version of the nbd generic-netlink interface.
pub const NBD_GENL_VERSION: u8 = 1;

/// `NBD_CMD_CONNECT`.
pub const NBD_CMD_CONNECT: u8 = 1;
/// `NBD_CMD_DISCONNECT`.
pub const NBD_CMD_DISCONNECT: u8 = 2;
/// `NBD_CMD_RECONFIGURE`.
pub const NBD_CMD_RECONFIGURE: u8 = 3;
/// `NBD_CMD_STATUS`.
pub const NBD_CMD_STATUS: u8 = 5;

/// `NBD_ATTR_INDEX` (u32).
pub const NBD_ATTR_INDEX: u16 = 1;
/// `NBD_ATTR_SIZE_BYTES` (u64).
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
/// `NBD_ATTR_BLOCK_SIZE_BYTES` (u64).
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
/// `NBD_ATTR_TIMEOUT` (u64 seconds).
pub const NBD_ATTR_TIMEOUT: u16 = 4;
/// `NBD_ATTR_SERVER_FLAGS` (u64).
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
/// `NBD_ATTR_CLIENT_FLAGS` (u64).
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
/// `NBD_ATTR_SOCKETS` (nested).
pub const NBD_ATTR_SOCKETS: u16 = 7;
/// `NBD_ATTR_DEAD_CONN_TIMEOUT` (u64 seconds).
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
/// `NBD_ATTR_DEVICE_LIST` (nested).
pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
/// `NBD_ATTR_BACKEND_IDENTIFIER` (string).
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
/// `NBD_SOCK_ITEM` (nested, inside `NBD_ATTR_SOCKETS`).
pub const NBD_SOCK_ITEM: u16 = 1;
/// `NBD_SOCK_FD` (u32).
pub const NBD_SOCK_FD: u16 = 1;
/// `NBD_DEVICE_ITEM` (nested, inside `NBD_ATTR_DEVICE_LIST`).
pub const NBD_DEVICE_ITEM: u16 = 1;
/// `NBD_DEVICE_INDEX` (u32).
pub const NBD_DEVICE_INDEX: u16 = 1;
/// `NBD_DEVICE_CONNECTED` (u8).
pub const NBD_DEVICE_CONNECTED: u16 = 2;
/// Client flag: remove the device when it disconnects.
pub const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;
/// Client flag: disconnect when the netlink socket that connected closes.
pub const NBD_CFLAG_DISCONNECT_ON_CLOSE: u64 = 1 << 1;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one generic-netlink request.
#[derive(Debug)]
pub struct MessageBuilder {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl MessageBuilder {
    /// Starts a request to `family` with generic command `cmd`.
    pub fn new(family: u16, seq: u32, cmd: u8, version: u8) -> MessageBuilder {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel fills in
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        MessageBuilder {
            buf,
            nests: Vec::new(),
        }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// Adds a u16 attribute.
    pub fn u16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// Adds a u32 attribute.
    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// Adds a u64 attribute.
    pub fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// Adds a NUL-terminated string attribute.
    pub fn string(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(ty, &v)
    }

    /// Opens a nested attribute; close it with [`end_nested`](Self::end_nested).
    pub fn begin_nested(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost nested attribute.
    pub fn end_nested(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("end_nested without begin_nested");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The finished message.
    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.nests.is_empty(), "unclosed nested attribute");
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut m = MessageBuilder::new(GENL_ID_CTRL, seq, CTRL_CMD_GETFAMILY, 1);
    m.string(CTRL_ATTR_FAMILY_NAME, name);
    m.finish()
}

/// Parameters of `NBD_CMD_CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// Device index, or `None` to let the kernel pick a free one.
    pub index: Option<u32>,
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size (power of two, 512..=4096).
    pub block_size: u64,
    /// Per-request timeout in seconds (`None`: kernel default).
    pub timeout: Option<u64>,
    /// How long to wait for a dead connection to be replaced (seconds).
    pub dead_conn_timeout: Option<u64>,
    /// NBD transmission flags.
    pub server_flags: u64,
    /// `NBD_CFLAG_*`.
    pub client_flags: u64,
    /// The client ends of the connections.
    pub fds: Vec<RawFd>,
    /// Identifier shown in sysfs (`backend`).
    pub backend: Option<String>,
}

fn sockets(m: &mut MessageBuilder, fds: &[RawFd]) {
    m.begin_nested(NBD_ATTR_SOCKETS);
    for fd in fds {
        m.begin_nested(NBD_SOCK_ITEM);
        m.u32(NBD_SOCK_FD, *fd as u32);
        m.end_nested();
    }
    m.end_nested();
}

/// `NBD_CMD_CONNECT`.
pub fn connect(family: u16, seq: u32, p: &ConnectParams) -> Vec<u8> {
    let mut m = MessageBuilder::new(family, seq, NBD_CMD_CONNECT, NBD_GENL_VERSION);
    if let Some(i) = p.index {
        m.u32(NBD_ATTR_INDEX, i);
    }
    m.u64(NBD_ATTR_SIZE_BYTES, p.size);
    m.u64(NBD_ATTR_BLOCK_SIZE_BYTES, p.block_size);
    if let Some(t) = p.timeout {
        m.u64(NBD_ATTR_TIMEOUT, t);
    }
    if let Some(t) = p.dead_conn_timeout {
        m.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, t);
    }
    m.u64(NBD_ATTR_SERVER_FLAGS, p.server_flags);
    m.u64(NBD_ATTR_CLIENT_FLAGS, p.client_flags);
    if let Some(b) = &p.backend {
        m.string(NBD_ATTR_BACKEND_IDENTIFIER, b);
    }
    sockets(&mut m, &p.fds);
    m.finish()
}

/// `NBD_CMD_RECONFIGURE`: hands the kernel new connections for `index`
/// (replacing dead ones).
pub fn reconfigure(
    family: u16,
    seq: u32,
    index: u32,
    fds: &[RawFd],
    dead_conn_timeout: Option<u64>,
) -> Vec<u8> {
    let mut m = MessageBuilder::new(family, seq, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION);
    m.u32(NBD_ATTR_INDEX, index);
    if let Some(t) = dead_conn_timeout {
        m.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, t);
    }
    sockets(&mut m, fds);
    m.finish()
}

/// `NBD_CMD_DISCONNECT`.
pub fn disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut m = MessageBuilder::new(family, seq, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
    m.u32(NBD_ATTR_INDEX, index);
    m.finish()
}

/// `NBD_CMD_STATUS` for one device.
pub fn status(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut m = MessageBuilder::new(family, seq, NBD_CMD_STATUS, NBD_GENL_VERSION);
    m.u32(NBD_ATTR_INDEX, index);
    m.finish()
}

/// One received netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// Payload after the netlink header.
    pub payload: &'a [u8],
}

/// Splits a datagram into messages; truncated trailing data is ignored.
pub fn messages(mut buf: &[u8]) -> Vec<Message<'_>> {
    let mut v = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        v.push(Message {
            kind: u16::from_ne_bytes([buf[4], buf[5]]),
            seq: u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes")),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    v
}

/// The errno of an `NLMSG_ERROR` message (0 is an ack), `None` for others.
pub fn error_code(m: &Message<'_>) -> Option<i32> {
    if m.kind != NLMSG_ERROR || m.payload.len() < 4 {
        return None;
    }
    Some(-i32::from_ne_bytes(
        m.payload[0..4].try_into().expect("4 bytes"),
    ))
}

/// Attributes `(type without flags, data)` of an attribute area.
pub fn attributes(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & !(NLA_F_NESTED | (1 << 14));
        if len < 4 || len > buf.len() {
            break;
        }
        v.push((ty, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    v
}

/// Attributes of a generic-netlink message (after its 4-byte genl header).
pub fn genl_attributes<'a>(m: &Message<'a>) -> Vec<(u16, &'a [u8])> {
    if m.payload.len() < GENL_HDRLEN {
        return Vec::new();
    }
    attributes(&m.payload[GENL_HDRLEN..])
}

/// The family id in a `CTRL_CMD_GETFAMILY` reply.
pub fn family_id(m: &Message<'_>) -> Option<u16> {
    genl_attributes(m)
        .into_iter()
        .find(|(t, d)| *t == CTRL_ATTR_FAMILY_ID && d.len() >= 2)
        .map(|(_, d)| u16::from_ne_bytes([d[0], d[1]]))
}

/// The device index in an `NBD_CMD_CONNECT` reply.
pub fn connect_index(m: &Message<'_>) -> Option<u32> {
    genl_attributes(m)
        .into_iter()
        .find(|(t, d)| *t == NBD_ATTR_INDEX && d.len() >= 4)
        .map(|(_, d)| u32::from_ne_bytes(d[..4].try_into().expect("4 bytes")))
}

/// `(index, connected)` pairs in an `NBD_CMD_STATUS` reply.
pub fn status_devices(m: &Message<'_>) -> Vec<(u32, bool)> {
    let mut out = Vec::new();
    for (t, list) in genl_attributes(m) {
        if t != NBD_ATTR_DEVICE_LIST {
            continue;
        }
        for (t, item) in attributes(list) {
            if t != NBD_DEVICE_ITEM {
                continue;
            }
            let mut index = None;
            let mut connected = false;
            for (t, d) in attributes(item) {
                match t {
                    NBD_DEVICE_INDEX if d.len() >= 4 => {
                        index = Some(u32::from_ne_bytes(d[..4].try_into().expect("4 bytes")))
                    }
                    NBD_DEVICE_CONNECTED if !d.is_empty() => connected = d[0] != 0,
                    _ => {}
                }
            }
            if let Some(i) = index {
                out.push((i, connected));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_family_layout() {
        let m = get_family(7, "nbd");
        // 16 header + 4 genl + attr(4 + "nbd\0") = 28
        assert_eq!(m.len(), 28);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 28);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), GENL_ID_CTRL);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(m[16], CTRL_CMD_GETFAMILY);
        assert_eq!(u16::from_ne_bytes([m[20], m[21]]), 8);
        assert_eq!(u16::from_ne_bytes([m[22], m[23]]), CTRL_ATTR_FAMILY_NAME);
        assert_eq!(&m[24..28], b"nbd\0");
    }

    #[test]
    fn connect_round_trips_through_the_parser() {
        let p = ConnectParams {
            index: Some(3),
            size: 1 << 30,
            block_size: 4096,
            timeout: Some(30),
            dead_conn_timeout: Some(10),
            server_flags: 0x1ff,
            client_flags: NBD_CFLAG_DESTROY_ON_DISCONNECT,
            fds: vec![5, 6, 7],
            backend: Some("silo:disk".into()),
        };
        let buf = connect(0x20, 1, &p);
        let msgs = messages(&buf);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].kind, 0x20);
        assert_eq!(msgs[0].payload[0], NBD_CMD_CONNECT);
        let attrs = genl_attributes(&msgs[0]);
        let get = |t| {
            attrs
                .iter()
                .find(|(ty, _)| *ty == t)
                .map(|(_, d)| *d)
                .unwrap()
        };
        assert_eq!(get(NBD_ATTR_INDEX), 3u32.to_ne_bytes());
        assert_eq!(get(NBD_ATTR_SIZE_BYTES), (1u64 << 30).to_ne_bytes());
        assert_eq!(get(NBD_ATTR_BLOCK_SIZE_BYTES), 4096u64.to_ne_bytes());
        assert_eq!(get(NBD_ATTR_TIMEOUT), 30u64.to_ne_bytes());
        assert_eq!(get(NBD_ATTR_DEAD_CONN_TIMEOUT), 10u64.to_ne_bytes());
        assert_eq!(get(NBD_ATTR_SERVER_FLAGS), 0x1ffu64.to_ne_bytes());
        assert_eq!(get(NBD_ATTR_BACKEND_IDENTIFIER), b"silo:disk\0");
        let socks = attributes(get(NBD_ATTR_SOCKETS));
        let fds: Vec<u32> = socks
            .iter()
            .map(|(t, item)| {
                assert_eq!(*t, NBD_SOCK_ITEM);
                let a = attributes(item);
                assert_eq!(a[0].0, NBD_SOCK_FD);
                u32::from_ne_bytes(a[0].1.try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, [5, 6, 7]);
        // The nested SOCKETS attribute carries the nested flag on the wire.
        let raw = &buf[16 + 4..];
        let mut at = 0;
        while at < raw.len() {
            let len = u16::from_ne_bytes([raw[at], raw[at + 1]]) as usize;
            let ty = u16::from_ne_bytes([raw[at + 2], raw[at + 3]]);
            if ty & !NLA_F_NESTED == NBD_ATTR_SOCKETS {
                assert_ne!(ty & NLA_F_NESTED, 0);
            }
            at += align4(len);
        }
    }

    #[test]
    fn other_commands() {
        let d = disconnect(0x20, 2, 4);
        let m = &messages(&d)[0];
        assert_eq!(m.payload[0], NBD_CMD_DISCONNECT);
        assert_eq!(connect_index(m), Some(4));
        let r = reconfigure(0x20, 3, 4, &[9], Some(5));
        let m = &messages(&r)[0];
        assert_eq!(m.payload[0], NBD_CMD_RECONFIGURE);
        assert_eq!(genl_attributes(m).len(), 3);
        let s = status(0x20, 4, 4);
        assert_eq!(messages(&s)[0].payload[0], NBD_CMD_STATUS);
    }

    #[test]
    fn parses_kernel_replies() {
        // An ack, an error, a family reply and a status reply in one datagram.
        let mut buf = Vec::new();
        let mut push = |kind: u16, payload: &[u8]| {
            let len = 16 + payload.len();
            buf.extend_from_slice(&(len as u32).to_ne_bytes());
            buf.extend_from_slice(&kind.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&9u32.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(payload);
            buf.resize(align4(buf.len()), 0);
        };
        push(NLMSG_ERROR, &0i32.to_ne_bytes());
        push(NLMSG_ERROR, &(-16i32).to_ne_bytes());
        let mut fam = MessageBuilder::new(GENL_ID_CTRL, 9, 1, 1);
        fam.string(CTRL_ATTR_FAMILY_NAME, "nbd")
            .u16(CTRL_ATTR_FAMILY_ID, 0x1a);
        let fam = fam.finish();
        push(GENL_ID_CTRL, &fam[16..]);
        let mut st = MessageBuilder::new(0x1a, 9, NBD_CMD_STATUS, 1);
        st.begin_nested(NBD_ATTR_DEVICE_LIST)
            .begin_nested(NBD_DEVICE_ITEM)
            .u32(NBD_DEVICE_INDEX, 2)
            .attr(NBD_DEVICE_CONNECTED, &[1])
            .end_nested()
            .end_nested();
        let st = st.finish();
        push(0x1a, &st[16..]);
        // Trailing garbage is ignored, not a panic.
        buf.extend_from_slice(&[0xff; 7]);

        let msgs = messages(&buf);
        assert_eq!(msgs.len(), 4);
        assert_eq!(error_code(&msgs[0]), Some(0));
        assert_eq!(error_code(&msgs[1]), Some(16));
        assert_eq!(error_code(&msgs[2]), None);
        assert_eq!(family_id(&msgs[2]), Some(0x1a));
        assert_eq!(status_devices(&msgs[3]), vec![(2, true)]);
    }

    #[test]
    fn parsers_survive_garbage() {
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37) ^ n).collect();
            for m in messages(&junk) {
                let _ = error_code(&m);
                let _ = family_id(&m);
                let _ = status_devices(&m);
            }
            let _ = attributes(&junk);
        }
    }
}
