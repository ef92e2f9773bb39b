//! The socket: RFC 6455 framing over the raw `TcpStream` of an upgraded
//! connection, read and written by the connection's one task.
//!
//! Why not fastwebsockets' reader and writer: its `read_frame` is not
//! cancel-safe (a frame header half read is lost when the future is
//! dropped), so a task that also waits for live events cannot `select!` on
//! it, which is what forced a reader task and a writer task per connection;
//! and it keeps an 8 KiB read buffer (plus a write buffer as large as the
//! largest frame written) for the life of the connection. Here:
//! - reading waits for readiness (`TcpStream::readable`, cancel-safe), then
//!   reads what is there into a buffer on the stack; only the bytes of an
//!   incomplete frame (or message) are kept, and released once it is whole,
//!   so an idle connection holds no read buffer;
//! - frames to send wait in a queue and are encoded into a write buffer
//!   that is released once written;
//! - client frames are checked as fastwebsockets did (and more): a frame
//!   without a mask (RFC 6455 5.1), reserved bits or opcodes, fragmented or
//!   oversize control frames: 1002; a message over `max_frame_bytes` (all
//!   its fragments) or of more than `max_fragments` fragments: 1009, refused
//!   from its header, before its payload is buffered; text that is not
//!   UTF-8: 1007.

use std::collections::VecDeque;
use std::sync::Arc;
use tokio::net::TcpStream;

use crate::fanout::GONE;
use crate::protocol::close;

/// A whole client message (or control frame the session cares about).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Message {
    Text(String),
    Binary,
    /// A WebSocket ping: answered with a pong of this payload.
    Ping(Vec<u8>),
    /// A pong: activity only.
    Pong,
    /// The client's close frame, with its code if it gave one.
    Close(Option<u16>),
}

/// Why reading stopped: the close code to answer with ([`GONE`]: the peer
/// is gone, nothing is sent) and the reason.
pub(super) type ReadError = (u16, &'static str);

/// Reassembles client messages from bytes, however they are split.
#[derive(Debug)]
pub(super) struct FrameReader {
    /// The bytes of a frame not complete yet (empty, unallocated, between
    /// frames).
    buf: Vec<u8>,
    /// A fragmented message being reassembled: (text?, bytes, fragments).
    partial: Option<(bool, Vec<u8>, usize)>,
    max_bytes: usize,
    max_fragments: usize,
}

impl FrameReader {
    pub fn new(max_bytes: usize, max_fragments: usize) -> Self {
        Self {
            buf: Vec::new(),
            partial: None,
            max_bytes,
            max_fragments,
        }
    }

    /// Feeds bytes read from the socket; whole messages go to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut VecDeque<Message>) -> Result<(), ReadError> {
        if self.buf.is_empty() {
            let used = self.parse(data, out)?;
            if used < data.len() {
                self.buf.extend_from_slice(&data[used..]);
            }
        } else {
            self.buf.extend_from_slice(data);
            let buf = std::mem::take(&mut self.buf);
            let used = self.parse(&buf, out);
            self.buf = buf;
            let used = used?;
            self.buf.drain(..used);
            if self.buf.is_empty() {
                self.buf = Vec::new();
            }
        }
        Ok(())
    }

    /// Parses whole frames from `b`; returns how many bytes they took.
    fn parse(&mut self, b: &[u8], out: &mut VecDeque<Message>) -> Result<usize, ReadError> {
        let mut at = 0;
        while let Some((used, fin, opcode, payload)) = self.frame(&b[at..])? {
            at += used;
            if let Some(m) = self.message(fin, opcode, payload)? {
                let stop = matches!(m, Message::Close(_));
                out.push_back(m);
                if stop {
                    return Ok(b.len());
                }
            }
        }
        Ok(at)
    }

    /// One frame from the start of `b`: (bytes used, fin, opcode, unmasked
    /// payload), or None when it is not complete yet.
    #[allow(clippy::type_complexity)]
    fn frame(&self, b: &[u8]) -> Result<Option<(usize, bool, u8, Vec<u8>)>, ReadError> {
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err((close::PROTOCOL_ERROR, "reserved bits set"));
        }
        let opcode = b[0] & 0x0f;
        if !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
            return Err((close::PROTOCOL_ERROR, "reserved opcode"));
        }
        if b[1] & 0x80 == 0 {
            return Err((close::PROTOCOL_ERROR, "client frame without a mask"));
        }
        let code = b[1] & 0x7f;
        let extended = match code {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header = 2 + extended + 4;
        if b.len() < 2 + extended {
            return Ok(None);
        }
        let len: u64 = match extended {
            0 => u64::from(code),
            2 => u64::from(u16::from_be_bytes([b[2], b[3]])),
            _ => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&b[2..10]);
                u64::from_be_bytes(l)
            }
        };
        let control = opcode >= 8;
        if control && (!fin || len > 125) {
            return Err((close::PROTOCOL_ERROR, "invalid control frame"));
        }
        let so_far = self.partial.as_ref().map_or(0, |p| p.1.len()) as u64;
        if len.saturating_add(if opcode == 0 { so_far } else { 0 }) > self.max_bytes as u64 {
            return Err((close::TOO_BIG, "message too big"));
        }
        let len = len as usize;
        if b.len() < header + len {
            return Ok(None);
        }
        let mask = [b[header - 4], b[header - 3], b[header - 2], b[header - 1]];
        let payload = b[header..header + len]
            .iter()
            .enumerate()
            .map(|(i, x)| x ^ mask[i & 3])
            .collect();
        Ok(Some((header + len, fin, opcode, payload)))
    }

    /// A frame's part in a message.
    fn message(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    ) -> Result<Option<Message>, ReadError> {
        let whole = match opcode {
            1 | 2 => {
                if self.partial.is_some() {
                    return Err((close::PROTOCOL_ERROR, "new message inside a fragmented one"));
                }
                if !fin {
                    self.partial = Some((opcode == 1, payload, 1));
                    return Ok(None);
                }
                (opcode == 1, payload)
            }
            0 => {
                let Some((text, mut bytes, n)) = self.partial.take() else {
                    return Err((close::PROTOCOL_ERROR, "continuation without a message"));
                };
                if n + 1 > self.max_fragments {
                    return Err((close::TOO_BIG, "message too big"));
                }
                bytes.extend_from_slice(&payload);
                if !fin {
                    self.partial = Some((text, bytes, n + 1));
                    return Ok(None);
                }
                (text, bytes)
            }
            8 => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                return Ok(Some(Message::Close(code)));
            }
            9 => return Ok(Some(Message::Ping(payload))),
            _ => return Ok(Some(Message::Pong)),
        };
        match whole {
            (true, bytes) => match String::from_utf8(bytes) {
                Ok(s) => Ok(Some(Message::Text(s))),
                Err(_) => Err((close::INVALID_PAYLOAD, "text is not UTF-8")),
            },
            (false, _) => Ok(Some(Message::Binary)),
        }
    }
}

/// A frame to send.
#[derive(Debug)]
pub(super) enum Outbound {
    Text(String),
    Shared(Arc<str>),
    Pong(Vec<u8>),
    Close(u16, String),
}

/// Appends a server frame (unmasked) to `buf`.
fn encode(item: &Outbound, buf: &mut Vec<u8>) {
    let (opcode, payload): (u8, &[u8]) = match item {
        Outbound::Text(s) => (1, s.as_bytes()),
        Outbound::Shared(s) => (1, s.as_bytes()),
        Outbound::Pong(p) => (10, p),
        Outbound::Close(..) => (8, &[]),
    };
    let mut close_payload = Vec::new();
    let payload = if let Outbound::Close(code, reason) = item {
        close_payload.extend_from_slice(&code.to_be_bytes());
        // A control frame's payload is at most 125 bytes.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        close_payload.extend_from_slice(&reason.as_bytes()[..end]);
        &close_payload[..]
    } else {
        payload
    };
    buf.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => buf.push(n as u8),
        n if n < 65_536 => {
            buf.push(126);
            buf.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            buf.push(127);
            buf.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    buf.extend_from_slice(payload);
}

/// Writes a close frame without waiting, if the socket takes it whole
/// (after a panic, when the writer's state cannot be trusted).
pub(super) fn try_close(stream: &TcpStream, code: u16, reason: &str) {
    let mut buf = Vec::new();
    encode(&Outbound::Close(code, reason.to_string()), &mut buf);
    let _ = stream.try_write(&buf);
}

/// Frames waiting to be written, and the bytes being written.
#[derive(Debug, Default)]
pub(super) struct Writer {
    queue: VecDeque<Outbound>,
    buf: Vec<u8>,
    at: usize,
    /// A close frame was encoded: nothing goes after it.
    close_encoded: bool,
}

/// Bytes encoded into one write at most (frames are never split between
/// writes of different buffers, only within one).
const WRITE_BATCH: usize = 64 * 1024;

impl Writer {
    pub fn push(&mut self, item: Outbound) {
        if !self.close_encoded {
            self.queue.push_back(item);
        }
    }

    /// Frames queued (not yet encoded).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// No frame is partly written: another frame may go to the socket.
    pub fn at_frame_boundary(&self) -> bool {
        self.at == 0 || self.at >= self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.at >= self.buf.len()
    }

    /// Drops the frames not started (a close must go out now); a frame
    /// being written is finished first.
    pub fn clear_queue(&mut self) {
        self.queue = VecDeque::new();
    }

    fn refill(&mut self) {
        if self.at < self.buf.len() {
            return;
        }
        self.buf.clear();
        self.at = 0;
        while let Some(item) = self.queue.front() {
            if !self.buf.is_empty() && self.buf.len() >= WRITE_BATCH {
                break;
            }
            encode(item, &mut self.buf);
            let is_close = matches!(item, Outbound::Close(..));
            self.queue.pop_front();
            if is_close {
                self.close_encoded = true;
                self.queue = VecDeque::new();
                break;
            }
        }
        if self.queue.is_empty() && self.queue.capacity() > 16 {
            self.queue = VecDeque::new();
        }
    }

    /// Writes what the socket takes without waiting; true if any byte went.
    pub fn write_some(&mut self, stream: &TcpStream) -> std::io::Result<bool> {
        let mut progress = false;
        loop {
            self.refill();
            if self.at >= self.buf.len() {
                // Everything written: release the buffer.
                self.buf = Vec::new();
                self.at = 0;
                return Ok(progress);
            }
            match stream.try_write(&self.buf[self.at..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.at += n;
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(progress),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads what the socket has (at most a few chunks) into `reader` without
/// waiting. Ok(false): nothing was there (a spurious readiness).
pub(super) fn read_some(
    stream: &TcpStream,
    reader: &mut FrameReader,
    out: &mut VecDeque<Message>,
) -> Result<bool, ReadError> {
    // On the stack, not in the connection's state: an idle connection
    // holds no read buffer.
    let mut chunk = [0u8; 16 * 1024];
    let mut any = false;
    for _ in 0..4 {
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err((GONE, "")),
            Ok(n) => {
                any = true;
                reader.feed(&chunk[..n], out)?;
                if n < chunk.len() || !out.is_empty() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return Err((GONE, "")),
        }
    }
    Ok(any)
}

/// Reads and discards until EOF, at most `limit` bytes or `wait`: after our
/// close frame, so closing the socket does not reset it before the client
/// read the close.
pub(super) async fn linger(stream: &TcpStream, wait: std::time::Duration, limit: usize) {
    let _ = tokio::time::timeout(wait, async {
        let mut total = 0;
        while total < limit {
            if stream.readable().await.is_err() {
                break;
            }
            let mut chunk = [0u8; 4096];
            match stream.try_read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client frame: fin + `opcode`, the length in its shortest form, a
    /// mask key when `masked`, then the payload (masked).
    fn frame_op(opcode: u8, fin: bool, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(bit | n as u8),
            n if n < 65536 => {
                out.push(bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [1u8, 2, 3, 4];
        if masked {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    fn frame(payload: &[u8], masked: bool) -> Vec<u8> {
        frame_op(1, true, payload, masked)
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Message>, ReadError> {
        let mut r = FrameReader::new(64 * 1024, 4);
        let mut out = VecDeque::new();
        r.feed(bytes, &mut out)?;
        Ok(out.into())
    }

    #[test]
    fn masked_frames_of_every_length_form_pass() {
        let mut r = FrameReader::new(1 << 20, 4);
        let mut out = VecDeque::new();
        for n in [0, 1, 125, 126, 1000, 65535, 65536, 70_000] {
            r.feed(&frame(&vec![b'x'; n], true), &mut out).unwrap();
            assert_eq!(out.pop_front(), Some(Message::Text("x".repeat(n))));
        }
        assert!(r.buf.capacity() == 0, "no buffer kept between frames");
    }

    #[test]
    fn protocol_violations_have_their_close_codes() {
        assert_eq!(read_all(&frame(b"hi", false)).unwrap_err().0, 1002);
        assert_eq!(read_all(&[0xc1, 0x80, 0, 0, 0, 0]).unwrap_err().0, 1002); // rsv1
        assert_eq!(read_all(&frame_op(3, true, b"", true)).unwrap_err().0, 1002);
        assert_eq!(
            read_all(&frame_op(9, false, b"", true)).unwrap_err().0,
            1002
        );
        assert_eq!(
            read_all(&frame_op(9, true, &[0; 126], true)).unwrap_err().0,
            1002
        );
        assert_eq!(
            read_all(&frame_op(0, true, b"x", true)).unwrap_err().0,
            1002
        );
        let mut two = frame_op(1, false, b"a", true);
        two.extend(frame_op(1, true, b"b", true));
        assert_eq!(read_all(&two).unwrap_err().0, 1002);
        assert_eq!(read_all(&frame(&[0xff, 0xfe], true)).unwrap_err().0, 1007);
        assert_eq!(
            read_all(&frame(&vec![b' '; 64 * 1024 + 1], true))
                .unwrap_err()
                .0,
            1009
        );
        // Refused from the header alone: the payload never arrives.
        let huge = frame_op(1, true, &[], true);
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(read_all(&header).unwrap_err().0, 1009);
        assert!(read_all(&huge).is_ok());
        // Fragments: over the size together, or too many.
        let mut frags = frame_op(1, false, &[b' '; 40_000], true);
        frags.extend(frame_op(0, true, &[b' '; 40_000], true));
        assert_eq!(read_all(&frags).unwrap_err().0, 1009);
        let mut many = frame_op(1, false, b" ", true);
        for _ in 0..4 {
            many.extend(frame_op(0, false, b" ", true));
        }
        assert_eq!(read_all(&many).unwrap_err().0, 1009);
    }

    #[test]
    fn fragments_control_frames_and_close() {
        let mut b = frame_op(1, false, b"{\"a\":", true);
        b.extend(frame_op(9, true, b"p", true));
        b.extend(frame_op(0, true, b"1}", true));
        b.extend(frame_op(2, true, b"\x00", true));
        b.extend(frame_op(10, true, b"", true));
        b.extend(frame_op(8, true, &1000u16.to_be_bytes(), true));
        b.extend(frame(b"after close", true));
        assert_eq!(
            read_all(&b).unwrap(),
            vec![
                Message::Ping(b"p".to_vec()),
                Message::Text("{\"a\":1}".into()),
                Message::Binary,
                Message::Pong,
                Message::Close(Some(1000)),
            ]
        );
    }

    #[test]
    fn server_frames_encode_every_length_form() {
        for n in [0usize, 125, 126, 65_535, 65_536] {
            let mut buf = Vec::new();
            encode(&Outbound::Text("y".repeat(n)), &mut buf);
            let header = match n {
                n if n < 126 => 2,
                n if n < 65_536 => 4,
                _ => 10,
            };
            assert_eq!(buf.len(), header + n);
            assert_eq!(buf[0], 0x81);
        }
        let mut buf = Vec::new();
        encode(&Outbound::Close(4008, "x".repeat(300)), &mut buf);
        assert_eq!(&buf[..4], &[0x88, 125, 0x0f, 0xa8]);
    }

    proptest! {
        /// Any split of a stream of masked frames reads the same messages;
        /// the same stream with one frame unmasked fails at that frame.
        #[test]
        fn splits_do_not_matter(
            lens in proptest::collection::vec(0usize..300, 1..8),
            unmasked in proptest::option::of(0usize..8),
            cuts in proptest::collection::vec(1usize..64, 1..64),
        ) {
            let mut stream = Vec::new();
            for (i, n) in lens.iter().enumerate() {
                stream.extend(frame(&vec![b'a'; *n], unmasked != Some(i)));
            }
            let bad = unmasked.is_some_and(|u| u < lens.len());
            let mut r = FrameReader::new(1 << 20, 4);
            let mut out = VecDeque::new();
            let mut at = 0;
            let mut failed = None;
            let mut cut = cuts.iter().cycle();
            while at < stream.len() {
                let end = (at + cut.next().unwrap()).min(stream.len());
                if let Err(e) = r.feed(&stream[at..end], &mut out) {
                    failed = Some(e.0);
                    break;
                }
                at = end;
            }
            if bad {
                prop_assert_eq!(failed, Some(1002));
                prop_assert_eq!(out.len(), unmasked.unwrap());
            } else {
                prop_assert_eq!(failed, None);
                prop_assert_eq!(out.len(), lens.len());
                prop_assert!(r.buf.is_empty());
            }
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut out = VecDeque::new();
            let _ = FrameReader::new(1024, 4).feed(&bytes, &mut out);
        }
    }
}
